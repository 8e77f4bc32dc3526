// Command pause is the pod sandbox's infra process: it holds the pod's
// namespaces open and does nothing else. It replaces the C pause program of
// kubernetes/build/pause (registry.k8s.io/pause) because no image registry is
// reachable here; the image hack/kind/node-image.sh builds from it is tagged
// registry.k8s.io/pause:3.10.2 so kubelet and containerd find their sandbox
// image. Behaviour kept from pause.c: exit 0 on SIGINT/SIGTERM, reap every
// child that gets re-parented to it (it is PID 1 when the pod shares its PID
// namespace), and `-v` prints the version.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

// version is the upstream pause version this program stands in for.
const version = "3.10.2"

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-v" {
		fmt.Printf("pause.go %s\n", version)
		return
	}
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "Warning: pause should be the first process")
	}
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range sigs {
		if sig != syscall.SIGCHLD {
			fmt.Fprintf(os.Stderr, "Shutting down, got signal: %v\n", sig)
			os.Exit(0)
		}
		// Several exits can collapse into one SIGCHLD: reap until none is left.
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
