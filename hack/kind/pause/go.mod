module keylimit.local/hack/kind/pause

go 1.26.0
