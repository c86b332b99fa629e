#!/usr/bin/env bash
# bench-matrix.sh: `make bench`. In one run, on the same file size and the
# same machine, hemd bench drives four vhost-user-blk back-ends:
#   hemd-enc   hemd serving an encrypted volume (AES-256-XTS, key from the embedded KMS)
#   hemd-raw   hemd serving a raw file (no encryption)
#   qsd-raw    qemu-storage-daemon's vhost-user-blk export of a raw file
#   qsd-luks   qemu-storage-daemon over a LUKS2 image (aes-xts-plain64)
# for 4 KiB random read and write at QD 1 and 32, and 128 KiB sequential read
# and write, with 1 and 2 queues, and prints a table with ratios against qsd.
# Knobs: SIZE (default 1G), RUNTIME (default 5s), DIR (default build/bench),
# BACKENDS (default "hemd-enc hemd-raw qsd-raw qsd-luks"), WORKLOADS (a
# subset, as "rw bs depth queues" entries separated by commas), FILL_BS (the
# block size the disk is written with first, default 4k), DIRECT=1 (every
# back-end bypasses the page cache: hemd --direct, qemu-storage-daemon
# cache.direct=on with aio=io_uring).
set -euo pipefail
cd "$(dirname "$0")/../.."
size=${SIZE:-1G}
runtime=${RUNTIME:-5s}
dir=${DIR:-$PWD/build/bench}
fill_bs=${FILL_BS:-4k}
hemd_opts=() qsd_file=""
if [ "${DIRECT:-0}" = 1 ]; then hemd_opts=(--direct) qsd_file=",cache.direct=on,aio=io_uring"; fi
backends=${BACKENDS:-"hemd-enc hemd-raw qsd-raw qsd-luks"}
hemd=$PWD/build/hemd
mkdir -p "$dir"
rm -f "$dir"/*.img "$dir"/*.sock "$dir"/*.json "$dir"/*.log
export HEMD_STATE_DIR=$dir/state

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

waitsock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "bench: $1 did not appear" >&2; exit 1; }


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
		qemu-img create -q -f luks --object secret,id=s0,data=hemd-bench -o key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64 "$img" "$size"
		qemu-storage-daemon --object secret,id=s0,data=hemd-bench \
			--blockdev driver=file,node-name=f0,filename="$img"$qsd_file --blockdev driver=luks,node-name=l0,file=f0,key-secret=s0 \
			--export type=vhost-user-blk,id=e0,node-name=l0,addr.type=unix,addr.path="$sock",writable=on,num-queues=2 2>"$dir/$b.log" &
		;;
	esac
	pids+=($!)
	echo $! >"$dir/$b.pid"
	waitsock "$sock"
	# Write the whole disk once: reads then hit allocated blocks everywhere.
	"$hemd" bench --socket "$sock" --rw write --bs "$fill_bs" --depth 32 --once --runtime 600s --size "$size" --json >/dev/null &
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
print("| workload | " + " | ".join(f"{b} IOPS" for b in backends) + " | hemd-enc/qsd-raw | hemd-enc/qsd-luks | hemd-enc/hemd-raw |")
print("|---" * (len(backends) + 4) + "|")
for w in workloads:
    rw, bs, qd, q = w.split()
    r = {b: get(b, w) for b in backends}
    cells = []
    for b in backends:
        x = r[b]
        cells.append("-" if x is None else f"{x['iops']:.0f} ({x['mb_s']:.0f} MB/s, p99 {x['lat_p99_us']:.0f}us, {x.get('cpu_s_per_mio', 0):.1f} cpu-s/Mio)")
    def ratio(a, b):
        return "-" if not r.get(a) or not r.get(b) else f"{r[a]['iops'] / r[b]['iops']:.2f}x"
    print(f"| {rw} {bs} QD{qd} q{q} | " + " | ".join(cells) + f" | {ratio('hemd-enc','qsd-raw')} | {ratio('hemd-enc','qsd-luks')} | {ratio('hemd-enc','hemd-raw')} |")
PY
