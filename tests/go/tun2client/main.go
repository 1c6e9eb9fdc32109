// Command tun2client behaves like the Go tun2 client: it dials the tunnel
// server (TCP or TLS), runs a smux client session with the default config,
// accepts the control stream, writes its Auth as one JSON object, then serves
// every further stream as HTTP through a reverse proxy to --backend.
//
// Output lines on stdout: "AUTH-SENT id=N" once the Auth is written. On exit
// (the session ended) it prints "SESSION-END err" and exits with status 1.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"

	"github.com/xtaci/smux"
)

// auth is what the client sends on the control stream.
type auth struct {
	Token  string `json:"token"`
	Domain string `json:"domain"`
}

// streamListener turns a smux session into a net.Listener of accepted streams.
type streamListener struct{ session *smux.Session }

func (l streamListener) Accept() (net.Conn, error) { return l.session.AcceptStream() }
func (l streamListener) Close() error              { return l.session.Close() }
func (l streamListener) Addr() net.Addr            { return l.session.LocalAddr() }

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "tun2client: "+format+"\n", args...)
	os.Exit(2)
}

func dial(addr string, useTLS, insecure bool, caFile, serverName string) net.Conn {
	if !useTLS {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			fail("dial %s: %v", addr, err)
		}
		return conn
	}
	cfg := &tls.Config{InsecureSkipVerify: insecure, ServerName: serverName}
	if cfg.ServerName == "" {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			fail("bad --server %q: %v", addr, err)
		}
		cfg.ServerName = host
	}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			fail("read --ca: %v", err)
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(pem) {
			fail("no PEM certificate in %s", caFile)
		}
	}
	conn, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		fail("TLS dial %s: %v", addr, err)
	}
	return conn
}

func main() {
	server := flag.String("server", "", "tunnel server address HOST:PORT")
	useTLS := flag.Bool("tls", false, "wrap the connection in TLS")
	insecure := flag.Bool("insecure", false, "TLS: do not verify the server certificate")
	caFile := flag.String("ca", "", "TLS: PEM file of the CA to trust")
	serverName := flag.String("server-name", "", "TLS: name to verify (default: host of --server)")
	token := flag.String("token", "", "auth token")
	domain := flag.String("domain", "", "domain to register")
	backend := flag.String("backend", "", "backend URL, e.g. http://127.0.0.1:8080")
	flag.Parse()
	if *server == "" || *backend == "" {
		fail("--server and --backend are required")
	}
	backendURL, err := url.Parse(*backend)
	if err != nil {
		fail("bad --backend: %v", err)
	}

	conn := dial(*server, *useTLS, *insecure, *caFile, *serverName)
	session, err := smux.Client(conn, smux.DefaultConfig())
	if err != nil {
		fail("smux client: %v", err)
	}
	control, err := session.AcceptStream()
	if err != nil {
		fmt.Printf("SESSION-END %v\n", err)
		os.Exit(1)
	}
	body, _ := json.Marshal(auth{Token: *token, Domain: *domain})
	if _, err := control.Write(body); err != nil {
		fmt.Printf("SESSION-END %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("AUTH-SENT id=%d\n", control.ID())

	proxy := httputil.NewSingleHostReverseProxy(backendURL)
	err = http.Serve(streamListener{session}, proxy)
	fmt.Printf("SESSION-END %v\n", err)
	os.Exit(1)
}
