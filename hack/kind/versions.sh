# Pinned versions for the kind tier, in one place. Sourced by hack/kind/*.sh.
# K8S_VERSION must match hack/build-tools.sh and hack/k8s/go.mod.
K8S_VERSION=v1.37.2
# etcd and pause as `kubeadm config images list --kubernetes-version v1.37.2` names them.
ETCD_NODE_VERSION=v3.7.0
PAUSE_VERSION=3.10.2
CONTAINERD_VERSION=v2.4.2
CNI_PLUGINS_VERSION=v1.10.0
CRICTL_VERSION=v1.37.0
KIND_VERSION=v0.33.0
COREDNS_VERSION=v1.14.6
DEBIAN_SUITE=bookworm
