// Wrapper module that builds the etcd server binary from the pinned
// go.etcd.io/etcd/server/v3 release. Used by hack/build-tools.sh only.
//
// etcd's server module replaces its sibling modules with ../ paths, which do
// not apply to a dependency, so each sibling is pinned here to the same tag.
// To bump: change ETCD_VERSION in hack/build-tools.sh, the require and every
// replace below, then `go mod tidy`.
module keylimit.local/hack/etcd

go 1.26.0

tool go.etcd.io/etcd/server/v3

require go.etcd.io/etcd/server/v3 v3.6.16

replace (
	go.etcd.io/etcd/api/v3 => go.etcd.io/etcd/api/v3 v3.6.16
	go.etcd.io/etcd/client/pkg/v3 => go.etcd.io/etcd/client/pkg/v3 v3.6.16
	go.etcd.io/etcd/client/v3 => go.etcd.io/etcd/client/v3 v3.6.16
	go.etcd.io/etcd/pkg/v3 => go.etcd.io/etcd/pkg/v3 v3.6.16
)
