#!/usr/bin/env bash
# bench-matrix.sh: `make bench`. In one run, on the same file size and the
# same machine, hemd bench drives four vhost-user-blk back-ends:
#   hemd-enc   hemd serving an encrypted volume (AES-256-XTS, key from the embedded KMS)
#   hemd-raw   hemd serving a raw file (no encryption)
#   qsd-raw    qemu-storage-daemon's vhost-user-blk export of a raw file
#   qsd-luks   qemu-storage-daemon over a LUKS2 image (aes-xts-plain64)
# and, on Ceph RBD (a one-node cluster this script starts in DIR/ceph: one
# monitor, one manager, one BlueStore OSD on a sparse file, on this host):
#   hemd-enc-rbd  hemd serving an encrypted volume on an RBD image
#   qsd-rbd       qemu-storage-daemon's rbd driver, a raw image
#   qsd-rbd-luks  qemu-storage-daemon's LUKS2 (aes-xts-plain64) over its rbd driver
# for 4 KiB random read and write at QD 1 and 32, and 128 KiB sequential read
# and write, with 1 and 2 queues, and prints a table with ratios against qsd.
# Knobs: SIZE (default 1G), RUNTIME (default 5s), DIR (default build/bench),
# BACKENDS (default all seven; the RBD ones only where Ceph is installed:
# make deps), WORKLOADS (a subset, as "rw bs depth queues" entries separated
# by commas), FILL_BS (the block size a file disk is written with first,
# default 4k; an RBD disk is written with FILL_BS_RBD, default 1m),
# DIRECT=1 (every file back-end bypasses the page cache: hemd --direct,
# qemu-storage-daemon cache.direct=on with aio=io_uring). The RBD back-ends
# keep librbd's default writeback cache (rbd_cache; flushed on every guest
# FLUSH), hemd and qemu-storage-daemon alike.
set -euo pipefail
cd "$(dirname "$0")/../.."
size=${SIZE:-1G}
runtime=${RUNTIME:-5s}
dir=${DIR:-$PWD/build/bench}
fill_bs=${FILL_BS:-4k}
hemd_opts=() qsd_file=""
if [ "${DIRECT:-0}" = 1 ]; then hemd_opts=(--direct) qsd_file=",cache.direct=on,aio=io_uring"; fi
fill_bs_rbd=${FILL_BS_RBD:-1m}
default_backends="hemd-enc hemd-raw qsd-raw qsd-luks"
if command -v ceph-osd >/dev/null; then default_backends="$default_backends hemd-enc-rbd qsd-rbd qsd-rbd-luks"; fi
backends=${BACKENDS:-$default_backends}
hemd=$PWD/build/hemd
mkdir -p "$dir"
rm -f "$dir"/*.img "$dir"/*.sock "$dir"/*.json "$dir"/*.log
rm -rf "$dir/ceph"
export HEMD_STATE_DIR=$dir/state

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

waitsock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "bench: $1 did not appear" >&2; exit 1; }

# luks_create formats $1 as LUKS2 (aes-xts-plain64) of size $2. qemu-img
# times PBKDF2 on this CPU first, and on a loaded machine that can fail
# ("Unable to get accurate CPU usage"): it is tried again.
luks_create() {
	local i
	for i in 1 2 3; do
		qemu-img create -q -f luks --object secret,id=s0,data=hemd-bench \
			-o key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64 "$1" "$2" && return 0
		sleep 1
	done
	return 1
}

# start_ceph brings up the one-node cluster (storage/rbd/cephtest/cephup)
# and points hemd at it (HEMD_CEPH_*); cleanup stops it (SIGTERM: the OSD
# and the manager, then the monitor).
start_ceph() {
	echo "# starting a one-node Ceph cluster in $dir/ceph" >&2
	go build -o "$dir/cephup" ./storage/rbd/cephtest/cephup
	"$dir/cephup" --dir "$dir/ceph" 2>"$dir/cephup.log" &
	pids+=($!)
	for _ in $(seq 600); do [ -f "$dir/ceph/env" ] && break; kill -0 "${pids[-1]}" 2>/dev/null || break; sleep 0.2; done
	[ -f "$dir/ceph/env" ] || { echo "bench: the Ceph cluster did not come up:" >&2; tail -20 "$dir/cephup.log" >&2; exit 1; }
	# shellcheck disable=SC1091
	. "$dir/ceph/env"
	export HEMD_CEPH_CONF=$CEPH_CONF_FILE HEMD_CEPH_ID=$CEPH_CLIENT_ID HEMD_CEPH_KEYRING=$CEPH_KEYRING_FILE
	rbd_qsd="conf=$CEPH_CONF_FILE,user=$CEPH_CLIENT_ID,pool=$CEPH_POOL"
}


start_backend() {
	local b=$1 sock=$dir/$1.sock img=$dir/$1.img
	case $b in
	hemd-raw)
		truncate -s "$size" "$img"
		"$hemd" serve "${hemd_opts[@]}" --socket "$sock" --volume "$img" --queues 2 2>"$dir/$b.log" &
		;;
	hemd-enc)
		"$hemd" key describe alias/hemd-bench >/dev/null 2>&1 || "$hemd" key create --alias alias/hemd-bench >/dev/null
		"$hemd" volume create --size "$size" --key alias/hemd-bench "$img" >/dev/null
		"$hemd" serve "${hemd_opts[@]}" --socket "$sock" --volume "$img" --queues 2 2>"$dir/$b.log" &
		;;
	qsd-raw)
		truncate -s "$size" "$img"
		qemu-storage-daemon --blockdev driver=file,node-name=f0,filename="$img"$qsd_file \
			--export type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path="$sock",writable=on,num-queues=2 2>"$dir/$b.log" &
		;;
	qsd-luks)
		luks_create "$img" "$size"
		qemu-storage-daemon --object secret,id=s0,data=hemd-bench \
			--blockdev driver=file,node-name=f0,filename="$img"$qsd_file --blockdev driver=luks,node-name=l0,file=f0,key-secret=s0 \
			--export type=vhost-user-blk,id=e0,node-name=l0,addr.type=unix,addr.path="$sock",writable=on,num-queues=2 2>"$dir/$b.log" &
		;;
	hemd-enc-rbd)
		"$hemd" key describe alias/hemd-bench >/dev/null 2>&1 || "$hemd" key create --alias alias/hemd-bench >/dev/null
		"$hemd" volume create --size "$size" --key alias/hemd-bench "rbd:$CEPH_POOL/hemd-enc" >/dev/null
		"$hemd" serve --socket "$sock" --volume "rbd:$CEPH_POOL/hemd-enc" --queues 2 --control none 2>"$dir/$b.log" &
		;;
	qsd-rbd)
		rbd -c "$CEPH_CONF_FILE" --id "$CEPH_CLIENT_ID" create --size "$size" "$CEPH_POOL/qsd-raw"
		qemu-storage-daemon --blockdev driver=rbd,node-name=r0,$rbd_qsd,image=qsd-raw \
			--export type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path="$sock",writable=on,num-queues=2 2>"$dir/$b.log" &
		;;
	qsd-rbd-luks)
		luks_create "rbd:$CEPH_POOL/qsd-luks:conf=$CEPH_CONF_FILE:id=$CEPH_CLIENT_ID" "$size"
		qemu-storage-daemon --object secret,id=s0,data=hemd-bench \
			--blockdev driver=rbd,node-name=r0,$rbd_qsd,image=qsd-luks --blockdev driver=luks,node-name=l0,file=r0,key-secret=s0 \
			--export type=vhost-user-blk,id=e0,node-name=l0,addr.type=unix,addr.path="$sock",writable=on,num-queues=2 2>"$dir/$b.log" &
		;;
	esac
	pids+=($!)
	echo $! >"$dir/$b.pid"
	waitsock "$sock"
	# Write the whole disk once: reads then hit allocated blocks everywhere.
	local bs=$fill_bs
	case $b in *-rbd*) bs=$fill_bs_rbd ;; esac
	"$hemd" bench --socket "$sock" --rw write --bs "$bs" --depth 32 --once --runtime 600s --size "$size" --json >/dev/null &
	local fill=$!
	sleep 0.1
	wait $fill || true
}

workloads=(
	"randread 4k 1 1" "randread 4k 32 1" "randwrite 4k 1 1" "randwrite 4k 32 1"
	"read 128k 32 1" "write 128k 32 1"
	"randread 4k 32 2" "randwrite 4k 32 2" "read 128k 32 2" "write 128k 32 2"
)
if [ -n "${WORKLOADS:-}" ]; then IFS=, read -r -a workloads <<<"$WORKLOADS"; fi

# All back-ends run side by side; each workload then runs on each of them in
# turn, the order rotated from one workload to the next, so that the drift
# of this shared machine spreads over all of them.
read -r -a order <<<"$backends"
case " $backends " in *-rbd*) start_ceph ;; esac
for b in "${order[@]}"; do
	echo "# starting $b" >&2
	start_backend "$b"
done
for i in "${!workloads[@]}"; do
	w=${workloads[$i]}
	set -- $w
	n=${#order[@]}
	for k in $(seq 0 $((n - 1))); do
		b=${order[$(((i + k) % n))]}
		out=$dir/$b.$1.$2.qd$3.q$4.json
		# Every run starts with no dirty pages: writeback left by the one
		# before must not be charged to it.
		sync
		"$hemd" bench --socket "$dir/$b.sock" --rw "$1" --bs "$2" --depth "$3" --queues "$4" \
			--runtime "$runtime" --size "$size" --pid "$(cat "$dir/$b.pid")" --json >"$out"
		echo "# $b $w: $(grep -o '"iops": [0-9.]*' "$out")" >&2
	done
done

# The table: IOPS, MB/s, p99, backend CPU s per million I/Os, and ratios of IOPS against qsd.
python3 - "$dir" "$backends" "${workloads[@]}" <<'PY'
import json, sys, os
d, backends, workloads = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
def get(b, w):
    rw, bs, qd, q = w.split()
    p = os.path.join(d, f"{b}.{rw}.{bs}.qd{qd}.q{q}.json")
    return json.load(open(p)) if os.path.exists(p) else None
ratios = [("hemd-enc", "qsd-raw"), ("hemd-enc", "qsd-luks"), ("hemd-enc", "hemd-raw"),
          ("hemd-enc-rbd", "qsd-rbd"), ("hemd-enc-rbd", "qsd-rbd-luks")]
ratios = [(a, b) for a, b in ratios if a in backends and b in backends]
print("| workload | " + " | ".join(f"{b} IOPS" for b in backends) + " | " + " | ".join(f"{a}/{b}" for a, b in ratios) + " |")
print("|---" * (len(backends) + len(ratios) + 1) + "|")
for w in workloads:
    rw, bs, qd, q = w.split()
    r = {b: get(b, w) for b in backends}
    cells = []
    for b in backends:
        x = r[b]
        cells.append("-" if x is None else f"{x['iops']:.0f} ({x['mb_s']:.0f} MB/s, p99 {x['lat_p99_us']:.0f}us, {x.get('cpu_s_per_mio', 0):.1f} cpu-s/Mio)")
    def ratio(a, b):
        return "-" if not r.get(a) or not r.get(b) else f"{r[a]['iops'] / r[b]['iops']:.2f}x"
    print(f"| {rw} {bs} QD{qd} q{q} | " + " | ".join(cells) + " | " + " | ".join(ratio(a, b) for a, b in ratios) + " |")
PY
