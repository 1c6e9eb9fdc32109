// Command tun2server behaves like the Go tun2 server: it accepts tunnel
// connections (TCP, or TLS with --cert/--key), runs a smux server session
// (keepalive 1 s / 15 s), opens control stream 2, decodes the client's Auth
// and, when it matches --token/--domain, routes public HTTP requests whose
// Host equals the domain over a new stream each (req.Write, then
// http.ReadResponse). It pings every client with GET /health every
// --ping-interval, with a 1 s timeout. Like the original, any failed round
// trip or ping drops the whole connection, and auth failures close the
// session without a word.
//
// The original loses the client's Auth now and then (smux writes the SYN of
// stream 2 before it registers the stream, docs/protocol.md#differences). --avoid-auth-race
// holds back reading the tunnel until stream 2 is registered, for tests that
// need the rest of the behaviour without that race.
//
// Output lines on stdout:
//
//	READY tunnel=PORT http=PORT
//	REGISTERED domain=D remote=ADDR
//	REJECTED token=T domain=D
//	DROPPED domain=D reason
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/xtaci/smux"
)

type auth struct {
	Token  string `json:"token"`
	Domain string `json:"domain"`
}

// connection is one registered tunnel client.
type connection struct {
	session *smux.Session
	domain  string
	remote  string
	drop    sync.Once
}

// gatedConn holds every Read back until open is closed.
type gatedConn struct {
	net.Conn
	open chan struct{}
}

func (g gatedConn) Read(p []byte) (int, error) {
	<-g.open
	return g.Conn.Read(p)
}

type server struct {
	token, domain string
	pingInterval  time.Duration
	avoidRace     bool

	mu    sync.Mutex
	conns map[string][]*connection
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "tun2server: "+format+"\n", args...)
	os.Exit(2)
}

func (s *server) register(c *connection) {
	s.mu.Lock()
	s.conns[c.domain] = append(s.conns[c.domain], c)
	s.mu.Unlock()
	fmt.Printf("REGISTERED domain=%s remote=%s\n", c.domain, c.remote)
}

// dropConnection deregisters c and closes its session, once.
func (s *server) dropConnection(c *connection, reason error) {
	c.drop.Do(func() {
		s.mu.Lock()
		list := s.conns[c.domain]
		for i, other := range list {
			if other == c {
				s.conns[c.domain] = append(list[:i:i], list[i+1:]...)
				break
			}
		}
		s.mu.Unlock()
		c.session.Close()
		fmt.Printf("DROPPED domain=%s %v\n", c.domain, reason)
	})
}

// pick chooses one registered connection for host uniformly at random.
func (s *server) pick(host string) *connection {
	s.mu.Lock()
	defer s.mu.Unlock()
	list := s.conns[host]
	if len(list) == 0 {
		return nil
	}
	return list[rand.Intn(len(list))]
}

func (s *server) handleTunnel(conn net.Conn) {
	cfg := smux.DefaultConfig()
	cfg.KeepAliveInterval = time.Second
	cfg.KeepAliveTimeout = 15 * time.Second
	gate := gatedConn{conn, make(chan struct{})}
	if !s.avoidRace {
		close(gate.open)
	}
	session, err := smux.Server(gate, cfg)
	if err != nil {
		fail("smux server: %v", err)
	}
	control, err := session.OpenStream()
	if s.avoidRace {
		close(gate.open)
	}
	if err != nil {
		session.Close()
		return
	}
	var a auth
	if err := json.NewDecoder(control).Decode(&a); err != nil {
		session.Close()
		return
	}
	if a.Token != s.token || a.Domain != s.domain {
		fmt.Printf("REJECTED token=%s domain=%s\n", a.Token, a.Domain)
		session.Close()
		return
	}
	c := &connection{session: session, domain: a.Domain, remote: conn.RemoteAddr().String()}
	s.register(c)
	ticker := time.NewTicker(s.pingInterval)
	defer ticker.Stop()
	for range ticker.C {
		if err := s.ping(c); err != nil {
			s.dropConnection(c, err)
			return
		}
	}
}

func (s *server) ping(c *connection) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://backend/health", nil)
	resp, err := roundTrip(c.session, req)
	if err != nil {
		return fmt.Errorf("ping: %v", err)
	}
	resp.Body.Close()
	return nil
}

// roundTrip sends req on a new stream and reads one response; the stream is
// closed when the request's context ends, as in the original.
func roundTrip(session *smux.Session, req *http.Request) (*http.Response, error) {
	stream, err := session.OpenStream()
	if err != nil {
		return nil, fmt.Errorf("can't open session stream: %v", err)
	}
	go func() {
		<-req.Context().Done()
		stream.Close()
	}()
	if err := req.Write(stream); err != nil {
		return nil, fmt.Errorf("can't write request: %v", err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(stream), req)
	if err != nil {
		return nil, fmt.Errorf("connection stream can't read response: %v", err)
	}
	return resp, nil
}

func noBackendPage(w http.ResponseWriter, r *http.Request) {
	body := fmt.Sprintf("<html><head><title>no backends connected</title></head><body>"+
		"<h1>no backends connected</h1><p>Please ensure a backend is running for %s. "+
		"This is request ID %s.</p></body></html>", r.Host, r.Header.Get("X-Request-Id"))
	// The original answers with the request's own header map.
	for name, values := range r.Header {
		w.Header()[name] = values
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Content-Length", fmt.Sprint(len(body)))
	w.Header().Set("Connection", "close")
	w.WriteHeader(http.StatusBadGateway)
	io.WriteString(w, body)
}

// flushWriter flushes after every write so streamed responses stay streamed.
type flushWriter struct{ w http.ResponseWriter }

func (f flushWriter) Write(p []byte) (int, error) {
	n, err := f.w.Write(p)
	if flusher, ok := f.w.(http.Flusher); ok {
		flusher.Flush()
	}
	return n, err
}

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c := s.pick(r.Host)
	if c == nil {
		noBackendPage(w, r)
		return
	}
	resp, err := roundTrip(c.session, r)
	if err != nil {
		s.dropConnection(c, err)
		http.Error(w, "tun2: "+err.Error(), http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	for name, values := range resp.Header {
		w.Header()[name] = values
	}
	w.WriteHeader(resp.StatusCode)
	io.Copy(flushWriter{w}, resp.Body)
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "tunnel listen address")
	httpAddr := flag.String("http", "127.0.0.1:0", "public HTTP listen address")
	certFile := flag.String("cert", "", "TLS certificate (PEM); TLS is used when given")
	keyFile := flag.String("key", "", "TLS private key (PEM)")
	token := flag.String("token", "", "the one accepted token")
	domain := flag.String("domain", "", "the one accepted domain")
	pingInterval := flag.Duration("ping-interval", 5*time.Second, "health ping period")
	avoidRace := flag.Bool("avoid-auth-race", false, "read the tunnel only once stream 2 is registered")
	flag.Parse()

	tunnel, err := net.Listen("tcp", *listen)
	if err != nil {
		fail("listen %s: %v", *listen, err)
	}
	if *certFile != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			fail("load --cert/--key: %v", err)
		}
		tunnel = tls.NewListener(tunnel, &tls.Config{Certificates: []tls.Certificate{cert}})
	}
	public, err := net.Listen("tcp", *httpAddr)
	if err != nil {
		fail("listen %s: %v", *httpAddr, err)
	}
	s := &server{token: *token, domain: *domain, pingInterval: *pingInterval,
		avoidRace: *avoidRace,
		conns:     map[string][]*connection{}}
	fmt.Printf("READY tunnel=%d http=%d\n", tunnel.Addr().(*net.TCPAddr).Port,
		public.Addr().(*net.TCPAddr).Port)
	go http.Serve(public, s)
	for {
		conn, err := tunnel.Accept()
		if err != nil {
			fail("accept: %v", err)
		}
		go s.handleTunnel(conn)
	}
}
