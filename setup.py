"""Packaging for tun2g, the gevent reimplementation of the tun2 HTTP tunnel."""

from setuptools import find_packages, setup

setup(
    name="tun2g",
    version="0.1.0",
    description="Self-hosted HTTP tunnel on gevent, wire-compatible with Go tun2 (smux over TLS/KCP)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["tun2g", "tun2g.*"]),
    package_data={"tun2g.client": ["static/*.html", "static/*.js"]},
    include_package_data=True,
    install_requires=[
        "gevent>=24.2",
        "pyOpenSSL>=24.0",
        "cryptography>=42",
        "httptools>=0.6",
        "click>=8.1",
        "structlog>=24.1",
        "redis>=5.0",
        "requests>=2.31",
        "siokcp>=0.0.5",
        "prometheus-client>=0.17",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "psutil>=5.9",
            "gunicorn>=22",
            "websocket-client>=1.7",
            "mypy>=1.10",
            "types-requests",
            "acme>=5.0", "josepy>=1.14",  # tests/server/test_acme.py against Debian's pebble
            "playwright>=1.40",  # drives Debian's chromium (scripts/install-test-deps); no browser download
        ],
        "gunicorn": ["gunicorn[gevent]>=22"],  # the WSGI deploy shape: gunicorn -k gevent
        "bench": ["psutil>=5.9", "pyinstrument>=4.6", "py-spy>=0.3"],
        "acme": ["acme>=5.0", "josepy>=1.14"],  # `tun2g cert issue` (docs/https.md)
    },
    entry_points={"console_scripts": ["tun2g=tun2g.cli:main"]},
)
