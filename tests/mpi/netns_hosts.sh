#!/usr/bin/env bash
# Several hosts on one machine: runs the MPI pool tests with one rank per network namespace, the
# ranks talking only over private veth addresses (10.77.0.0/16), as separate machines would.
#   tests/mpi/netns_hosts.sh MPIEXEC TEST_BINARY
# Needs root and network namespaces (ip netns); exits 77 (CTest: skipped) with the reason when
# they are not available. Everything it creates is removed on exit.
set -euo pipefail
mpiexec=$1
binary=$2

skip() {
  echo "skipped: $*"
  exit 77
}
[[ $(id -u) -eq 0 ]] || skip "needs root to create network namespaces"
command -v ip >/dev/null || skip "ip (iproute2) is not installed"
command -v unshare >/dev/null || skip "unshare (util-linux) is not installed"

tag=mp$$
hosts=("${tag}a" "${tag}b")
work=$(mktemp -d)
forward_before=$(cat /proc/sys/net/ipv4/ip_forward)
cleanup() {
  for i in 0 1; do
    ip netns del "${hosts[$i]}" 2>/dev/null || true
    ip link del "${tag}v$i" 2>/dev/null || true
  done
  echo "$forward_before" >/proc/sys/net/ipv4/ip_forward 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

ip netns add "${hosts[0]}" 2>/dev/null || skip "cannot create network namespaces here (ip netns add failed)"
ip netns add "${hosts[1]}" || skip "cannot create a second network namespace"
ip netns exec "${hosts[0]}" unshare --uts --mount true 2>/dev/null ||
  skip "cannot make UTS and mount namespaces inside a network namespace here"
# Each host: a veth pair from the root namespace, its own /24, a default route back.
connect() {
  local i=$1 host=${hosts[$1]} net=$(($1 + 1))
  ip link add "${tag}v$i" type veth peer name "${tag}p$i" &&
    ip link set "${tag}p$i" netns "$host" &&
    ip addr add "10.77.$net.1/24" dev "${tag}v$i" &&
    ip link set "${tag}v$i" up &&
    ip netns exec "$host" ip addr add "10.77.$net.2/24" dev "${tag}p$i" &&
    ip netns exec "$host" ip link set "${tag}p$i" up &&
    ip netns exec "$host" ip link set lo up &&
    ip netns exec "$host" ip route add default via "10.77.$net.1"
}
connect 0 || skip "cannot connect a namespace with a veth pair"
connect 1 || skip "cannot connect a namespace with a veth pair"
{ echo 1 >/proc/sys/net/ipv4/ip_forward; } 2>/dev/null || skip "cannot enable IP forwarding between the hosts"

# The hosts' names resolve to their addresses (else every lookup waits for a resolver that may not
# answer): a hosts file of their own, bind-mounted over /etc/hosts in a private mount namespace.
{
  echo "127.0.0.1 localhost"
  for i in 0 1; do echo "10.77.$((i + 1)).2 ${hosts[$i]}"; done
} >"$work/hosts"
# mpirun starts its daemon on each "host" through this agent instead of ssh: inside the host's
# network namespace, with the host's name (Open MPI tells daemons apart by hostname).
cat >"$work/agent" <<AGENT
#!/bin/sh
host=\$1
shift
exec ip netns exec "\$host" unshare --uts --mount sh -c "mount --bind $work/hosts /etc/hosts; hostname \$host; \$*"
AGENT
chmod +x "$work/agent"
printf '%s slots=2\n%s slots=2\n' "${hosts[0]}" "${hosts[1]}" >"$work/hostfile"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpirun_on_hosts() {
  ip netns exec "${hosts[0]}" unshare --uts --mount sh -c "mount --bind $work/hosts /etc/hosts; hostname ${hosts[0]}; exec \"$mpiexec\" --allow-run-as-root \
    --mca plm_rsh_agent $work/agent --mca routed direct --mca btl self,tcp \
    --mca oob_tcp_if_include 10.77.0.0/16 --mca btl_tcp_if_include 10.77.0.0/16 \
    --hostfile $work/hostfile -n 3 --map-by node $*"
}
# The ranks really are on two hosts.
# The ranks really are on two hosts (if Open MPI cannot even start a command there, the
# environment cannot run this test: skipped, with what mpirun said).
where=$(mpirun_on_hosts hostname 2>&1) || skip "mpirun cannot start processes in the namespaces: $where"
echo "ranks per host:"
sort <<<"$where" | uniq -c
for host in "${hosts[@]}"; do
  grep -q "$host" <<<"$where" || { echo "no rank ran on $host"; exit 1; }
done
mpirun_on_hosts "\"$binary\""
