// Command smuxpeer is a configurable xtaci/smux endpoint over TCP, used by the
// tun2g test suite and benchmarks as the reference peer.
//
// Modes:
//
//	echo    accept streams; echo each until EOF, then Close it
//	silent  like echo, but keepalive is off, so nothing is sent unprompted
//	check   open --streams streams (at most --parallel at a time); send each a
//	        pseudo-random payload (sizes cycle through --sizes), read the echo
//	        of the same length, compare sha256, then Close
//	source  open --streams streams and write --bytes on each, then Close; the
//	        bytes are pattern(--write-chunk) repeated (byte i = i % 251); then
//	        echo like echo mode until the session ends
//	sink    accept --streams streams and read each to EOF
//	rtt     open one stream and do --count round trips of a --sizes[0]-byte
//	        message (write it, read its echo)
//
// Output lines on stdout (one event per line, for the tests to wait on):
//
//	READY port=N            listening
//	CONNECTED               dialled and the session is up
//	STREAM id=N             a stream was accepted
//	FAIL id=N reason        a check failed
//	CHECK ok=N failed=M ids=3,5,... seconds=S
//	RESULT bytes=N streams=S seconds=T mbps=X
//	RTT count=N seconds=T us=X
//	SESSION-END err         the session died (AcceptStream returned err)
//
// A line "close" on stdin closes every session (Session.Close).
package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/xtaci/smux"
)

type options struct {
	listen, dial      string
	client, server    bool
	version           int
	keepaliveInterval time.Duration
	keepaliveTimeout  time.Duration
	keepaliveDisabled bool
	maxFrame          int
	streamBuffer      int
	receiveBuffer     int
	mode              string
	streams, parallel int
	sizes             []int
	bytesPerStream    int64
	count             int
	writeChunk        int
}

var stdout = struct {
	sync.Mutex
	w *bufio.Writer
}{w: bufio.NewWriter(os.Stdout)}

// say prints one event line and flushes it at once, so a waiting test sees it.
func say(format string, args ...interface{}) {
	stdout.Lock()
	defer stdout.Unlock()
	fmt.Fprintf(stdout.w, format+"\n", args...)
	stdout.w.Flush()
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "smuxpeer: "+format+"\n", args...)
	os.Exit(2)
}

func parseOptions() options {
	var o options
	var sizes string
	flag.StringVar(&o.listen, "listen", "", "listen on this TCP address (port 0 = any free port)")
	flag.StringVar(&o.dial, "dial", "", "dial this TCP address")
	flag.BoolVar(&o.client, "client", false, "smux client role (odd stream ids); default when dialling")
	flag.BoolVar(&o.server, "server", false, "smux server role (even stream ids); default when listening")
	flag.IntVar(&o.version, "version", 1, "smux protocol version, 1 or 2")
	flag.DurationVar(&o.keepaliveInterval, "keepalive-interval", 10*time.Second, "NOP interval")
	flag.DurationVar(&o.keepaliveTimeout, "keepalive-timeout", 30*time.Second, "silence before the session is closed")
	flag.BoolVar(&o.keepaliveDisabled, "keepalive-disabled", false, "send no NOPs and never time out")
	flag.IntVar(&o.maxFrame, "max-frame", 32768, "largest PSH payload sent")
	flag.IntVar(&o.streamBuffer, "stream-buffer", 65536, "v2 per-stream window advertised")
	flag.IntVar(&o.receiveBuffer, "receive-buffer", 4194304, "session receive budget")
	flag.StringVar(&o.mode, "mode", "echo", "echo, silent, check, source or sink")
	flag.IntVar(&o.streams, "streams", 1, "number of streams (check, source, sink)")
	flag.IntVar(&o.parallel, "parallel", 0, "check, source: streams in flight at once (0 = all)")
	flag.StringVar(&sizes, "sizes", "1024", "check: comma-separated payload sizes, cycled over the streams")
	flag.Int64Var(&o.bytesPerStream, "bytes", 1<<20, "source: bytes written on each stream")
	flag.IntVar(&o.writeChunk, "write-chunk", 65536, "source: bytes per Write call")
	flag.IntVar(&o.count, "count", 1000, "rtt: round trips")
	flag.Parse()

	if (o.listen == "") == (o.dial == "") {
		fail("give exactly one of --listen ADDR or --dial ADDR")
	}
	if o.client && o.server {
		fail("give at most one of --client and --server")
	}
	if !o.client && !o.server {
		o.client = o.dial != ""
	}
	for _, field := range strings.Split(sizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(field))
		if err != nil || n < 0 {
			fail("bad --sizes entry %q: want non-negative integers", field)
		}
		o.sizes = append(o.sizes, n)
	}
	if o.parallel <= 0 || o.parallel > o.streams {
		o.parallel = o.streams
	}
	if o.mode == "silent" {
		o.keepaliveDisabled = true
	}
	return o
}

func (o options) smuxConfig() *smux.Config {
	cfg := smux.DefaultConfig()
	cfg.Version = o.version
	cfg.KeepAliveDisabled = o.keepaliveDisabled
	cfg.KeepAliveInterval = o.keepaliveInterval
	cfg.KeepAliveTimeout = o.keepaliveTimeout
	cfg.MaxFrameSize = o.maxFrame
	cfg.MaxStreamBuffer = o.streamBuffer
	cfg.MaxReceiveBuffer = o.receiveBuffer
	if err := smux.VerifyConfig(cfg); err != nil {
		fail("invalid smux config: %v", err)
	}
	return cfg
}

// sessions remembers live sessions so a "close" command on stdin can reach them.
var sessions = struct {
	sync.Mutex
	live map[*smux.Session]bool
}{live: map[*smux.Session]bool{}}

func closeSessionsOnCommand() {
	scanner := bufio.NewScanner(os.Stdin)
	for scanner.Scan() {
		if strings.TrimSpace(scanner.Text()) == "close" {
			sessions.Lock()
			for s := range sessions.live {
				s.Close()
			}
			sessions.Unlock()
		}
	}
}

func newSession(conn net.Conn, o options) *smux.Session {
	var sess *smux.Session
	var err error
	if o.client {
		sess, err = smux.Client(conn, o.smuxConfig())
	} else {
		sess, err = smux.Server(conn, o.smuxConfig())
	}
	if err != nil {
		fail("smux session: %v", err)
	}
	sessions.Lock()
	sessions.live[sess] = true
	sessions.Unlock()
	return sess
}

// runMode drives one session in the chosen mode; it returns the process exit code.
func runMode(sess *smux.Session, o options) int {
	switch o.mode {
	case "echo", "silent":
		return serveEcho(sess)
	case "check":
		return runCheck(sess, o)
	case "source":
		return runSource(sess, o)
	case "sink":
		return runSink(sess, o)
	case "rtt":
		return runRTT(sess, o)
	}
	fail("unknown --mode %q", o.mode)
	return 2
}

func serveEcho(sess *smux.Session) int {
	for {
		stream, err := sess.AcceptStream()
		if err != nil {
			say("SESSION-END %v", err)
			sess.Close()
			return 0
		}
		say("STREAM id=%d", stream.ID())
		go func() {
			io.Copy(stream, stream)
			stream.Close()
		}()
	}
}

// pattern is what source mode sends: easy to regenerate on the other side.
func pattern(size int) []byte {
	buf := make([]byte, size)
	for i := range buf {
		buf[i] = byte(i % 251)
	}
	return buf
}

func payload(index, size int) []byte {
	buf := make([]byte, size)
	rand.New(rand.NewSource(int64(index) + 1)).Read(buf)
	return buf
}

// checkOne sends a payload on a new stream and verifies the echo; "" means success.
func checkOne(sess *smux.Session, index, size int) (uint32, string) {
	stream, err := sess.OpenStream()
	if err != nil {
		return 0, fmt.Sprintf("open: %v", err)
	}
	defer stream.Close()
	sent := payload(index, size)
	writeErr := make(chan error, 1)
	go func() {
		_, err := stream.Write(sent)
		writeErr <- err
	}()
	echoed := make([]byte, size)
	if _, err := io.ReadFull(stream, echoed); err != nil {
		return stream.ID(), fmt.Sprintf("read echo: %v", err)
	}
	if err := <-writeErr; err != nil {
		return stream.ID(), fmt.Sprintf("write: %v", err)
	}
	if sha256.Sum256(sent) != sha256.Sum256(echoed) {
		return stream.ID(), fmt.Sprintf("echo of %d bytes differs (first diff at %d)", size, firstDiff(sent, echoed))
	}
	return stream.ID(), ""
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return bytes.Compare(a, b)
}

func runCheck(sess *smux.Session, o options) int {
	start := time.Now()
	ids := make([]uint32, o.streams)
	failures := make([]string, o.streams)
	slots := make(chan struct{}, o.parallel)
	var wg sync.WaitGroup
	for i := 0; i < o.streams; i++ {
		slots <- struct{}{}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			defer func() { <-slots }()
			ids[i], failures[i] = checkOne(sess, i, o.sizes[i%len(o.sizes)])
		}(i)
	}
	wg.Wait()
	failed := 0
	idText := make([]string, len(ids))
	for i, reason := range failures {
		idText[i] = strconv.FormatUint(uint64(ids[i]), 10)
		if reason != "" {
			failed++
			say("FAIL id=%d %s", ids[i], reason)
		}
	}
	say("CHECK ok=%d failed=%d ids=%s seconds=%.3f", o.streams-failed, failed,
		strings.Join(idText, ","), time.Since(start).Seconds())
	sess.Close()
	if failed > 0 {
		return 1
	}
	return 0
}

func report(total int64, streams int, elapsed time.Duration) {
	seconds := elapsed.Seconds()
	say("RESULT bytes=%d streams=%d seconds=%.3f mbps=%.1f", total, streams, seconds,
		float64(total)/seconds/1e6)
}

func runSource(sess *smux.Session, o options) int {
	chunk := pattern(o.writeChunk)
	start := time.Now()
	errs := make(chan error, o.streams)
	slots := make(chan struct{}, o.parallel)
	for i := 0; i < o.streams; i++ {
		slots <- struct{}{}
		go func() {
			defer func() { <-slots }()
			stream, err := sess.OpenStream()
			if err != nil {
				errs <- err
				return
			}
			defer stream.Close()
			for left := o.bytesPerStream; left > 0; {
				n := int64(len(chunk))
				if left < n {
					n = left
				}
				if _, err := stream.Write(chunk[:n]); err != nil {
					errs <- err
					return
				}
				left -= n
			}
			errs <- nil
		}()
	}
	for i := 0; i < o.streams; i++ {
		if err := <-errs; err != nil {
			fmt.Fprintf(os.Stderr, "smuxpeer: source stream failed: %v\n", err)
			return 1
		}
	}
	report(o.bytesPerStream*int64(o.streams), o.streams, time.Since(start))
	// Keep the session (and the process) until the peer ends it, so it can drain
	// what is still queued; echo any stream it opens meanwhile.
	serveEcho(sess)
	return 0
}

func runSink(sess *smux.Session, o options) int {
	var start time.Time
	totals := make(chan int64, o.streams)
	for i := 0; i < o.streams; i++ {
		stream, err := sess.AcceptStream()
		if err != nil {
			fmt.Fprintf(os.Stderr, "smuxpeer: accept: %v\n", err)
			return 1
		}
		if i == 0 {
			start = time.Now()
		}
		go func() {
			n, err := io.Copy(io.Discard, stream)
			if err != nil {
				fmt.Fprintf(os.Stderr, "smuxpeer: sink stream %d: %v\n", stream.ID(), err)
			}
			stream.Close()
			totals <- n
		}()
	}
	var total int64
	for i := 0; i < o.streams; i++ {
		total += <-totals
	}
	report(total, o.streams, time.Since(start))
	sess.Close()
	return 0
}

func runRTT(sess *smux.Session, o options) int {
	stream, err := sess.OpenStream()
	if err != nil {
		fmt.Fprintf(os.Stderr, "smuxpeer: open: %v\n", err)
		return 1
	}
	message := payload(0, o.sizes[0])
	echo := make([]byte, len(message))
	start := time.Now()
	for i := 0; i < o.count; i++ {
		if _, err := stream.Write(message); err != nil {
			fmt.Fprintf(os.Stderr, "smuxpeer: rtt write: %v\n", err)
			return 1
		}
		if _, err := io.ReadFull(stream, echo); err != nil {
			fmt.Fprintf(os.Stderr, "smuxpeer: rtt read: %v\n", err)
			return 1
		}
	}
	elapsed := time.Since(start).Seconds()
	say("RTT count=%d seconds=%.3f us=%.1f", o.count, elapsed, elapsed/float64(o.count)*1e6)
	stream.Close()
	sess.Close()
	return 0
}

func main() {
	o := parseOptions()
	go closeSessionsOnCommand()
	if o.dial != "" {
		conn, err := net.Dial("tcp", o.dial)
		if err != nil {
			fail("dial %s: %v", o.dial, err)
		}
		sess := newSession(conn, o)
		say("CONNECTED")
		os.Exit(runMode(sess, o))
	}
	listener, err := net.Listen("tcp", o.listen)
	if err != nil {
		fail("listen %s: %v", o.listen, err)
	}
	say("READY port=%d", listener.Addr().(*net.TCPAddr).Port)
	for {
		conn, err := listener.Accept()
		if err != nil {
			fail("accept: %v", err)
		}
		sess := newSession(conn, o)
		if o.mode == "echo" || o.mode == "silent" {
			go runMode(sess, o) // serve every connection until killed
			continue
		}
		os.Exit(runMode(sess, o))
	}
}
