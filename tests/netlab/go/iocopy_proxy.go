// A TCP proxy that moves bytes the way Go programs do: io.Copy between two
// *net.TCPConn, which the runtime turns into splice(2) on Linux. Used by the
// datapath tests as an application that reads its sockets without copying.
//
// Usage: iocopy-proxy LISTEN_ADDR UPSTREAM_ADDR
package main

import (
	"fmt"
	"io"
	"net"
	"os"
)

func pipe(dst, src *net.TCPConn, done chan<- error) {
	_, err := io.Copy(dst, src) // (*TCPConn).ReadFrom: splice from src
	dst.CloseWrite()
	done <- err
}

func serve(down *net.TCPConn, upstream string) {
	defer down.Close()
	conn, err := net.Dial("tcp", upstream)
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		return
	}
	up := conn.(*net.TCPConn)
	defer up.Close()
	done := make(chan error, 2)
	go pipe(up, down, done)
	go pipe(down, up, done)
	for i := 0; i < 2; i++ {
		if err := <-done; err != nil {
			fmt.Fprintln(os.Stderr, "copy:", err)
		}
	}
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: iocopy-proxy LISTEN_ADDR UPSTREAM_ADDR")
		os.Exit(2)
	}
	listener, err := net.Listen("tcp", os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	fmt.Println("listening", listener.Addr())
	for {
		conn, err := listener.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, "accept:", err)
			os.Exit(1)
		}
		go serve(conn.(*net.TCPConn), os.Args[2])
	}
}
