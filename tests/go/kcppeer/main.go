// Command kcppeer is a kcp-go 5.6.1 endpoint laid out like tun2's KCP
// transport (kcp.Dial / kcp.ListenWithOptions(nil, 0, 0) on defaults, TLS
// inside KCP, smux inside TLS), used by tun2g's KCP tests and benchmark.
//
// Modes:
//
//	server        accept KCP sessions; per session: [TLS server], smux.Server with
//	              tun2's keepalive (1 s / 15 s), open a stream (id 2), write
//	              -payload, read its echo; echo every stream the client opens
//	client        dial; [TLS client]; smux.Client (default config); echo every
//	              stream the server opens; open one stream, write -bytes
//	              pseudo-random bytes, read the echo, compare
//	bench-server  raw KCP: per session read an 8-byte LE length, then that many
//	              bytes, then write "ok"
//	bench-client  raw KCP: send the length and -bytes bytes, wait for "ok"
//
// Output lines on stdout, one event per line, for the tests to wait on:
//
//	READY port=N | OPENED id=N | CONTROL-ECHO ok|bad | STREAM id=N |
//	CLIENT-CHECK ok|bad bytes=N | RESULT bytes=N seconds=S mbps=X | SESSION-END err
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"math/rand"
	"net"
	"os"
	"sync"
	"time"

	kcp "github.com/xtaci/kcp-go"
	"github.com/xtaci/smux"
)

var (
	mode       = flag.String("mode", "server", "server | client | bench-server | bench-client")
	addr       = flag.String("addr", "127.0.0.1:0", "listen or dial address")
	crypt      = flag.String("crypt", "off", "off (nil block, like kcp.Dial) | none (20-byte nonce+CRC header)")
	useTLS     = flag.Bool("tls", false, "run TLS inside KCP (tun2's kcp conn type)")
	certFile   = flag.String("cert", "", "server certificate (PEM)")
	keyFile    = flag.String("key", "", "server key (PEM)")
	caFile     = flag.String("ca", "", "CA the client trusts (PEM)")
	serverName = flag.String("servername", "localhost", "name the client verifies")
	smuxVer    = flag.Int("smuxver", 1, "smux protocol version")
	payload    = flag.String("payload", `{"token":"t","domain":"d"}`, "what the server writes on its stream")
	size       = flag.Int("bytes", 100000, "client check / bench size")
	lock       sync.Mutex
)

func say(format string, args ...interface{}) {
	lock.Lock()
	defer lock.Unlock()
	fmt.Printf(format+"\n", args...)
}

func block() kcp.BlockCrypt {
	if *crypt == "none" {
		b, _ := kcp.NewNoneBlockCrypt(nil)
		return b
	}
	return nil
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}

func echo(s *smux.Stream) {
	say("STREAM id=%d", s.ID())
	io.Copy(s, s)
	s.Close()
}

func acceptLoop(sess *smux.Session) {
	for {
		s, err := sess.AcceptStream()
		if err != nil {
			say("SESSION-END %v", err)
			return
		}
		go echo(s)
	}
}

func smuxConfig(keepalive, timeout time.Duration) *smux.Config {
	cfg := smux.DefaultConfig()
	cfg.Version = *smuxVer
	if keepalive > 0 {
		cfg.KeepAliveInterval, cfg.KeepAliveTimeout = keepalive, timeout
	}
	return cfg
}

func serveSession(conn net.Conn) {
	if *useTLS {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			fail(err)
		}
		conn = tls.Server(conn, &tls.Config{Certificates: []tls.Certificate{cert}})
	}
	sess, err := smux.Server(conn, smuxConfig(time.Second, 15*time.Second))
	if err != nil {
		fail(err)
	}
	go acceptLoop(sess)
	s, err := sess.OpenStream()
	if err != nil {
		say("SESSION-END %v", err)
		return
	}
	say("OPENED id=%d", s.ID())
	s.Write([]byte(*payload))
	back := make([]byte, len(*payload))
	if _, err := io.ReadFull(s, back); err == nil && string(back) == *payload {
		say("CONTROL-ECHO ok")
	} else {
		say("CONTROL-ECHO bad %v", err)
	}
}

func listen() *kcp.Listener {
	l, err := kcp.ListenWithOptions(*addr, block(), 0, 0)
	if err != nil {
		fail(err)
	}
	say("READY port=%d", l.Addr().(*net.UDPAddr).Port)
	return l
}

func dial() net.Conn {
	conn, err := kcp.DialWithOptions(*addr, block(), 0, 0)
	if err != nil {
		fail(err)
	}
	return conn
}

func client() {
	var conn net.Conn = dial()
	if *useTLS {
		pem, err := ioutil.ReadFile(*caFile)
		if err != nil {
			fail(err)
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		conn = tls.Client(conn, &tls.Config{RootCAs: pool, ServerName: *serverName})
	}
	sess, err := smux.Client(conn, smuxConfig(0, 0))
	if err != nil {
		fail(err)
	}
	go acceptLoop(sess)
	s, err := sess.OpenStream()
	if err != nil {
		fail(err)
	}
	data := make([]byte, *size)
	rand.New(rand.NewSource(7)).Read(data)
	go s.Write(data)
	back := make([]byte, len(data))
	if _, err := io.ReadFull(s, back); err == nil && bytes.Equal(back, data) {
		say("CLIENT-CHECK ok bytes=%d", len(data))
	} else {
		say("CLIENT-CHECK bad %v", err)
	}
	s.Close()
	io.Copy(ioutil.Discard, os.Stdin) // stay up (echoing) until the test closes stdin
}

func benchServe(conn net.Conn) {
	defer conn.Close()
	var header [8]byte
	if _, err := io.ReadFull(conn, header[:]); err != nil {
		return
	}
	n := int64(binary.LittleEndian.Uint64(header[:]))
	if _, err := io.CopyN(ioutil.Discard, conn, n); err != nil {
		return
	}
	conn.Write([]byte("ok"))
	time.Sleep(time.Second) // KCP has no close segment: let the "ok" be acknowledged
}

func benchClient() {
	conn := dial()
	data := make([]byte, 65536)
	var header [8]byte
	binary.LittleEndian.PutUint64(header[:], uint64(*size))
	start := time.Now()
	conn.Write(header[:])
	for left := *size; left > 0; {
		chunk := data
		if left < len(chunk) {
			chunk = chunk[:left]
		}
		if _, err := conn.Write(chunk); err != nil {
			fail(err)
		}
		left -= len(chunk)
	}
	ok := make([]byte, 2)
	if _, err := io.ReadFull(conn, ok); err != nil {
		fail(err)
	}
	seconds := time.Since(start).Seconds()
	say("RESULT bytes=%d seconds=%.3f mbps=%.3f", *size, seconds, float64(*size)/seconds/1e6)
}

func main() {
	flag.Parse()
	switch *mode {
	case "server", "bench-server":
		l := listen()
		for {
			sess, err := l.AcceptKCP()
			if err != nil {
				fail(err)
			}
			if *mode == "server" {
				go serveSession(sess)
			} else {
				go benchServe(sess)
			}
		}
	case "client":
		client()
	case "bench-client":
		benchClient()
	default:
		fail(fmt.Errorf("unknown mode %q", *mode))
	}
}
