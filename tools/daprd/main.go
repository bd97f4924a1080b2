// Command daprd is the Dapr sidecar, built from Dapr's published Go module at
// the version pinned in go.mod, so the test suite runs against the real runtime.
package main

import "github.com/dapr/dapr/cmd/daprd/app"

func main() {
	app.Run()
}
