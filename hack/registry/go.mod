// Pins go-containerregistry's registry (a plain OCI registry, in memory) and
// crane (pushes an image archive into it), which `ste-bench coldstart-real
// --images present,absent` runs on loopback so a real node's containerd can
// pull the function image. Built by hack/build-upstream.sh; do not import
// from Rust code.
module ste.dev/hack/registry

go 1.25.0

tool (
	github.com/google/go-containerregistry/cmd/crane
	github.com/google/go-containerregistry/cmd/registry
)

require (
	github.com/docker/cli v29.7.2+incompatible // indirect
	github.com/docker/docker-credential-helpers v0.9.3 // indirect
	github.com/google/go-cmp v0.7.0 // indirect
	github.com/google/go-containerregistry v0.22.1 // indirect
	github.com/inconshreveable/mousetrap v1.1.0 // indirect
	github.com/klauspost/compress v1.19.2 // indirect
	github.com/opencontainers/go-digest v1.0.0 // indirect
	github.com/opencontainers/image-spec v1.1.1 // indirect
	github.com/sirupsen/logrus v1.9.4 // indirect
	github.com/spf13/cobra v1.10.2 // indirect
	github.com/spf13/pflag v1.0.10 // indirect
	golang.org/x/sync v0.22.0 // indirect
	golang.org/x/sys v0.47.0 // indirect
)
