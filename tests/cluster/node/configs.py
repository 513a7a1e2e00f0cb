"""The node's configuration files, as pure functions of its paths and addresses.

What is set, and why, on these machines (2 cores, hybrid cgroup v1, no
CAP_SYS_RESOURCE, no default route allowed for pods):

- containerd: every path of its own (root, state, sockets, runc's root, pod
  network namespaces, its NRI socket is switched off), so a test node shares
  nothing with another node or with podman; runc from Debian, cgroupfs;
  apparmor off and OOM-score adjustments restricted (not permitted here).
- kubelet: cgroupfs without per-QoS cgroups or node-allocatable enforcement
  (no systemd, cgroup v1), no swap check, no eviction or image GC (a test
  node must not delete the images it was given), its own root, pod-log and
  resolv.conf (empty: pods get cluster DNS only, no host search domains).
- CNI: a bridge with ``ipMasq: false`` and explicit routes only; no portmap
  (restricted pods cannot use hostPort).
- kube-proxy: iptables mode, no conntrack sizing (a global sysctl).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.node.network import CLUSTER_DOMAIN, DNS_SERVICE_IP, SERVICE_CIDR, NodeNetwork

CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
RUNC = Path("/usr/sbin/runc")  # Debian's runc (crun fails on these hybrid-cgroup machines)


def containerd_toml(*, root: Path, state: Path, socket: Path, cni_conf_dir: Path, opt_dir: Path,
                    net: NodeNetwork, sandbox_image: str) -> str:  # fmt: skip
    cri_runtime = 'plugins."io.containerd.cri.v1.runtime"'
    return f"""\
version = 3
root = "{root}"
state = "{state}"
# Not used by the node; each would open a socket or directory outside the node's own paths.
disabled_plugins = ["io.containerd.nri.v1.nri", "io.containerd.image-verifier.v1.bindir",
                    "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt_dir}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{sandbox_image}"

[{cri_runtime}]
  restrict_oom_score_adj = true
  disable_apparmor = true
  tolerate_missing_hugetlb_controller = true
  netns_mounts_under_state_dir = true
  [{cri_runtime}.containerd]
    default_runtime_name = "runc"
    [{cri_runtime}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri_runtime}.containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        Root = "{state}/runc"
        SystemdCgroup = false
  [{cri_runtime}.cni]
    bin_dirs = ["{CNI_BIN_DIR}"]
    conf_dir = "{cni_conf_dir}"
    max_conf_num = 1

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "{net.node_ip}"
  stream_server_port = "0"
"""


def cni_conflist(net: NodeNetwork, ipam_dir: Path) -> str:
    """The pod network: a bridge, no masquerade, no default route; routes to Services and the host's link end."""
    config = {
        "cniVersion": "1.0.0",
        "name": "kubetune",
        "plugins": [
            {
                "type": "bridge",
                "bridge": net.bridge,
                "isGateway": True,
                "isDefaultGateway": False,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(ipam_dir),
                    "ranges": [[{"subnet": net.pod_cidr, "gateway": net.pod_gateway}]],
                    "routes": [
                        {"dst": SERVICE_CIDR, "gw": net.pod_gateway},
                        {"dst": f"{net.host_ip}/32", "gw": net.pod_gateway},
                    ],
                },
            },
            {"type": "loopback"},
        ],
    }
    return json.dumps(config, indent=2)


def kubelet_config(*, net: NodeNetwork, socket: Path, pod_logs: Path, resolv_conf: Path) -> str:
    config: dict[str, Any] = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{socket}",
        "address": net.node_ip,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": net.node_ip,
        "healthzPort": 10248,
        "cgroupDriver": "cgroupfs",
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "failSwapOn": False,
        "failCgroupV1": False,
        "protectKernelDefaults": False,
        "localStorageCapacityIsolation": False,
        "makeIPTablesUtilChains": False,
        "evictionHard": {},
        "evictionSoft": {},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "oomScoreAdj": 0,
        "podPidsLimit": -1,
        "clusterDNS": [DNS_SERVICE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(resolv_conf),
        "podLogsDir": str(pod_logs),
        # Status within a second or two of a change: tests wait on it.
        "nodeStatusUpdateFrequency": "10s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "shutdownGracePeriod": "0s",
    }
    return yaml.safe_dump(config, sort_keys=False)


def kube_proxy_config(*, net: NodeNetwork, kubeconfig: Path, node_name: str) -> str:
    config: dict[str, Any] = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": node_name,
        "clusterCIDR": net.pod_cidr,
        "bindAddress": net.node_ip,
        "healthzBindAddress": f"{net.node_ip}:10256",
        "metricsBindAddress": f"{net.node_ip}:10249",
        # Sizing conntrack writes global sysctls; the node's namespace has its own table.
        "conntrack": {"maxPerCore": 0, "min": 0},
        "iptables": {"syncPeriod": "30s", "minSyncPeriod": "0s"},
    }
    return yaml.safe_dump(config, sort_keys=False)
