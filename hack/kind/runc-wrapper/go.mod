module keylimit.dev/hack/kind/runc-wrapper

go 1.22
