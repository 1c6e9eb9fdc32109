from tests.client.support import counting_backend, inspected  # noqa: F401  (fixtures)
