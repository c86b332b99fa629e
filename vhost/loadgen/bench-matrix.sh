#!/usr/bin/env bash
# bench-matrix.sh: `make bench`. In one run, on the same file size and the
# same machine, hemd bench drives vhost-user-blk back-ends:
#   hemd-enc          hemd serving an encrypted volume (AES-256-XTS, key from the embedded KMS)
#   hemd-raw          hemd serving a raw file (no encryption)
#   qsd-raw-threads   qemu-storage-daemon's vhost-user-blk export of a raw file, aio=threads (QEMU's default)
#   qsd-raw-uring     the same with aio=io_uring
#   qsd-raw-native    the same with aio=native (Linux AIO; needs cache.direct=on, so always O_DIRECT)
#   qsd-luks-threads  qemu-storage-daemon over a LUKS2 image (aes-xts-plain64), aio=threads
#   qsd-luks-uring    the same with aio=io_uring
#   qsd-luks-native   the same with aio=native (cache.direct=on)
# The qsd-* file back-ends run with cache.direct=off (page cache), or
# cache.direct=on with DIRECT=1; qsd-raw and qsd-luks are the names of
# earlier runs: qsd-*-threads, or qsd-*-uring with DIRECT=1 (what they ran).
# On Ceph RBD (a one-node cluster this script starts in DIR/ceph: one
# monitor, one manager, one BlueStore OSD on a sparse file, on this host):
#   hemd-enc-rbd  hemd serving an encrypted volume on an RBD image
#   qsd-rbd       qemu-storage-daemon's rbd driver, a raw image
#   qsd-rbd-luks  qemu-storage-daemon's LUKS2 (aes-xts-plain64) over its rbd driver
# for 4 KiB random read and write at QD 1 and 32, and 128 KiB sequential read
# and write, with 1 and 2 queues. It prints (and writes to DIR/summary.md) a
# table of every cell, and a summary per workload: hemd-enc against the best
# qsd raw setting of that row (named), against hemd-raw, hemd-raw against the
# best qsd raw setting, CPU per I/O of hemd-enc against that qsd, and a
# PASS/MISS line per target (make bench's issue: hemd-enc >= 1.0x the best qsd
# raw setting and >= 0.9x hemd-raw, hemd-raw >= 1.2x the best qsd raw setting,
# hemd-enc's CPU per I/O at or below that qsd's, in every row).
# Knobs: SIZE (default 1G), RUNTIME (default 5s), DIR (default build/bench),
# BACKENDS (default hemd-enc hemd-raw qsd-raw-threads qsd-raw-uring
# qsd-luks-threads qsd-luks-uring, and qsd-raw-native with DIRECT=1; the RBD
# ones where Ceph is installed: make deps), WORKLOADS (a subset, as
# "rw bs depth queues" entries separated by commas), FILL_BS (the block size
# a file disk is written with first, default 4k; an RBD disk is written with
# FILL_BS_RBD, default 1m), DIRECT=1 (every file back-end bypasses the page
# cache: hemd --direct, qemu-storage-daemon cache.direct=on). The RBD
# back-ends keep librbd's default writeback cache (rbd_cache; flushed on
# every guest FLUSH), hemd and qemu-storage-daemon alike. HEMD names the
# hemd binary (default build/hemd).
set -euo pipefail
cd "$(dirname "$0")/../.."
size=${SIZE:-1G}
runtime=${RUNTIME:-5s}
dir=${DIR:-$PWD/build/bench}
fill_bs=${FILL_BS:-4k}
direct=${DIRECT:-0}
hemd_opts=(--control none) qsd_cache=off
if [ "$direct" = 1 ]; then hemd_opts+=(--direct) qsd_cache=on; fi
fill_bs_rbd=${FILL_BS_RBD:-1m}
default_backends="hemd-enc hemd-raw qsd-raw-threads qsd-raw-uring qsd-luks-threads qsd-luks-uring"
if [ "$direct" = 1 ]; then default_backends="$default_backends qsd-raw-native"; fi
if command -v ceph-osd >/dev/null; then default_backends="$default_backends hemd-enc-rbd qsd-rbd qsd-rbd-luks"; fi
# The back-ends, the old names qsd-raw and qsd-luks as what they ran, each once.
backends=""
for b in ${BACKENDS:-$default_backends}; do
	case $b in
	qsd-raw | qsd-luks) if [ "$direct" = 1 ]; then b=$b-uring; else b=$b-threads; fi ;;
	hemd-enc | hemd-raw | qsd-raw-threads | qsd-raw-uring | qsd-raw-native | qsd-luks-threads | qsd-luks-uring | qsd-luks-native) ;;
	hemd-enc-rbd | qsd-rbd | qsd-rbd-luks) ;;
	*)
		echo "bench: unknown back-end $b (see the head of $0)" >&2
		exit 2
		;;
	esac
	case " $backends " in *" $b "*) ;; *) backends="${backends:+$backends }$b" ;; esac
done
hemd=$(realpath "${HEMD:-build/hemd}")
mkdir -p "$dir"
rm -f "$dir"/*.img "$dir"/*.sock "$dir"/*.json "$dir"/*.log "$dir"/*.pid "$dir"/settings.tsv "$dir"/summary.md
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


# qsd_file_opts prints the file node's options of a qsd-* file back-end
# named with setting $1: threads, uring or native.
qsd_file_opts() {
	case $1 in
	threads) echo "aio=threads,cache.direct=$qsd_cache" ;;
	uring) echo "aio=io_uring,cache.direct=$qsd_cache" ;;
	native) echo "aio=native,cache.direct=on" ;; # QEMU refuses aio=native without O_DIRECT
	esac
}

# setting records what back-end $1 runs as ($2) for the summary.
setting() { printf '%s\t%s\n' "$1" "$2" >>"$dir/settings.tsv"; }

start_backend() {
	local b=$1 sock=$dir/$1.sock img=$dir/$1.img file
	case $b in
	hemd-raw)
		truncate -s "$size" "$img"
		"$hemd" serve "${hemd_opts[@]}" --socket "$sock" --volume "$img" --queues 2 2>"$dir/$b.log" &
		setting "$b" "hemd serve ${hemd_opts[*]} --queues 2 (io_uring), a raw file"
		;;
	hemd-enc)
		"$hemd" key describe alias/hemd-bench >/dev/null 2>&1 || "$hemd" key create --alias alias/hemd-bench >/dev/null
		"$hemd" volume create --size "$size" --key alias/hemd-bench "$img" >/dev/null
		"$hemd" serve "${hemd_opts[@]}" --socket "$sock" --volume "$img" --queues 2 2>"$dir/$b.log" &
		setting "$b" "hemd serve ${hemd_opts[*]} --queues 2 (io_uring), an encrypted volume (AES-256-XTS)"
		;;
	qsd-raw-threads | qsd-raw-uring | qsd-raw-native)
		truncate -s "$size" "$img"
		file=driver=file,node-name=f0,filename=$img,$(qsd_file_opts "${b##*-}")
		qemu-storage-daemon --blockdev "$file" \
			--export type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path="$sock",writable=on,num-queues=2 2>"$dir/$b.log" &
		setting "$b" "qemu-storage-daemon --blockdev ${file/filename=$img,/} --export type=vhost-user-blk,num-queues=2"
		;;
	qsd-luks-threads | qsd-luks-uring | qsd-luks-native)
		luks_create "$img" "$size"
		file=driver=file,node-name=f0,filename=$img,$(qsd_file_opts "${b##*-}")
		qemu-storage-daemon --object secret,id=s0,data=hemd-bench \
			--blockdev "$file" --blockdev driver=luks,node-name=l0,file=f0,key-secret=s0 \
			--export type=vhost-user-blk,id=e0,node-name=l0,addr.type=unix,addr.path="$sock",writable=on,num-queues=2 2>"$dir/$b.log" &
		setting "$b" "qemu-storage-daemon --blockdev ${file/filename=$img,/} --blockdev driver=luks (LUKS2 aes-xts-plain64) --export type=vhost-user-blk,num-queues=2"
		;;
	hemd-enc-rbd)
		"$hemd" key describe alias/hemd-bench >/dev/null 2>&1 || "$hemd" key create --alias alias/hemd-bench >/dev/null
		"$hemd" volume create --size "$size" --key alias/hemd-bench "rbd:$CEPH_POOL/hemd-enc" >/dev/null
		"$hemd" serve --socket "$sock" --volume "rbd:$CEPH_POOL/hemd-enc" --queues 2 --control none 2>"$dir/$b.log" &
		setting "$b" "hemd serve --queues 2, an encrypted volume on RBD (librbd writeback cache)"
		;;
	qsd-rbd)
		rbd -c "$CEPH_CONF_FILE" --id "$CEPH_CLIENT_ID" create --size "$size" "$CEPH_POOL/qsd-raw"
		qemu-storage-daemon --blockdev driver=rbd,node-name=r0,"$rbd_qsd",image=qsd-raw \
			--export type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path="$sock",writable=on,num-queues=2 2>"$dir/$b.log" &
		setting "$b" "qemu-storage-daemon --blockdev driver=rbd --export type=vhost-user-blk,num-queues=2"
		;;
	qsd-rbd-luks)
		luks_create "rbd:$CEPH_POOL/qsd-luks:conf=$CEPH_CONF_FILE:id=$CEPH_CLIENT_ID" "$size"
		qemu-storage-daemon --object secret,id=s0,data=hemd-bench \
			--blockdev driver=rbd,node-name=r0,"$rbd_qsd",image=qsd-luks --blockdev driver=luks,node-name=l0,file=r0,key-secret=s0 \
			--export type=vhost-user-blk,id=e0,node-name=l0,addr.type=unix,addr.path="$sock",writable=on,num-queues=2 2>"$dir/$b.log" &
		setting "$b" "qemu-storage-daemon --blockdev driver=rbd --blockdev driver=luks (LUKS2 aes-xts-plain64) --export type=vhost-user-blk,num-queues=2"
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
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
for b in "${order[@]}"; do
	echo "# starting $b" >&2
	start_backend "$b"
done
for i in "${!workloads[@]}"; do
	w=${workloads[$i]}
	read -r -a wf <<<"$w"
	set -- "${wf[@]}"
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

# The tables, printed and written to $dir/summary.md: every cell (IOPS,
# MB/s, p99, the back-end's CPU seconds per million I/Os), then per row
# hemd against the best qsd raw setting of that row, and the targets.
BENCH_STARTED=$started BENCH_SETTINGS="SIZE=$size RUNTIME=$runtime DIRECT=$direct FILL_BS=$fill_bs" \
	python3 - "$dir" "$backends" "${workloads[@]}" <<'PY' | tee "$dir/summary.md"
import json, os, sys
d, backends, workloads = sys.argv[1], sys.argv[2].split(), sys.argv[3:]

def get(b, w):
    rw, bs, qd, q = w.split()
    p = os.path.join(d, f"{b}.{rw}.{bs}.qd{qd}.q{q}.json")
    return json.load(open(p)) if os.path.exists(p) else None

def label(w):
    rw, bs, qd, q = w.split()
    return f"{rw} {bs} QD{qd} q{q}"

print(f"# make bench, started {os.environ['BENCH_STARTED']}: {os.environ['BENCH_SETTINGS']}")
print()
print("| back-end | settings |")
print("|---|---|")
settings = {}
if os.path.exists(os.path.join(d, "settings.tsv")):
    for line in open(os.path.join(d, "settings.tsv")):
        b, _, what = line.rstrip("\n").partition("\t")
        settings[b] = what
for b in backends:
    print(f"| {b} | `{settings.get(b, '?')}` |")
print()

# Every cell, and the ratios of the RBD back-ends.
rbd = [(a, b) for a, b in [("hemd-enc-rbd", "qsd-rbd"), ("hemd-enc-rbd", "qsd-rbd-luks")] if a in backends and b in backends]
print("| workload | " + " | ".join(f"{b} IOPS" for b in backends) + "".join(f" | {a}/{b}" for a, b in rbd) + " |")
print("|---" * (len(backends) + len(rbd) + 1) + "|")
for w in workloads:
    r = {b: get(b, w) for b in backends}
    cells = []
    for b in backends:
        x = r[b]
        cells.append("-" if x is None else f"{x['iops']:.0f} ({x['mb_s']:.0f} MB/s, p99 {x['lat_p99_us']:.0f}us, {x.get('cpu_s_per_mio', 0):.1f} cpu-s/Mio)")
    rat = [("-" if not r[a] or not r[b] else f"{r[a]['iops'] / r[b]['iops']:.2f}x") for a, b in rbd]
    print(f"| {label(w)} | " + " | ".join(cells + rat) + " |")
print()

# Per row: the best qsd raw setting (most IOPS) and hemd against it.
raw_qsd = [b for b in backends if b.startswith("qsd-raw-")]
luks_qsd = [b for b in backends if b.startswith("qsd-luks-")]
targets = [  # (what, threshold, the row's value or None)
    ("hemd-enc >= 1.0x the best qsd raw setting", 1.0, []),
    ("hemd-enc >= 0.9x hemd-raw", 0.9, []),
    ("hemd-raw >= 1.2x the best qsd raw setting", 1.2, []),
    ("hemd-enc CPU per I/O <= the best qsd raw setting's", None, []),
]

def best(r, names):
    have = [b for b in names if r.get(b)]
    return max(have, key=lambda b: r[b]["iops"]) if have else None

def ratio(x, y):
    return x["iops"] / y["iops"] if x and y else None

def fmt(v, who=""):
    return "-" if v is None else f"{v:.2f}x" + (f" ({who})" if who else "")

print("| workload | hemd-enc / best qsd raw | hemd-enc / hemd-raw | hemd-raw / best qsd raw | hemd-enc / best qsd LUKS | CPU-s per Mio I/O: hemd-enc vs best qsd raw |")
print("|---|---|---|---|---|---|")
for w in workloads:
    r = {b: get(b, w) for b in backends}
    br, bl = best(r, raw_qsd), best(r, luks_qsd)
    enc, raw = r.get("hemd-enc"), r.get("hemd-raw")
    e_q = ratio(enc, r.get(br)) if br else None
    e_r = ratio(enc, raw)
    r_q = ratio(raw, r.get(br)) if br else None
    e_l = ratio(enc, r.get(bl)) if bl else None
    cpu, cpu_ratio = "-", None
    if enc and br and enc.get("cpu_s_per_mio") and r[br].get("cpu_s_per_mio"):
        ce, cq = enc["cpu_s_per_mio"], r[br]["cpu_s_per_mio"]
        cpu_ratio = ce / cq
        cpu = f"{ce:.1f} vs {cq:.1f} ({cpu_ratio:.2f}x)"
    for (_, _, vals), v in zip(targets, (e_q, e_r, r_q, cpu_ratio)):
        vals.append((label(w), v))
    print(f"| {label(w)} | {fmt(e_q, br)} | {fmt(e_r)} | {fmt(r_q, br)} | {fmt(e_l, bl)} | {cpu} |")
print()

# The targets: PASS only where every row was measured and meets it.
for what, th, vals in targets:
    measured = [(w, v) for w, v in vals if v is not None]
    if not measured:
        print(f"- {what}: n/a (not measured in this run)")
        continue
    if th is None:
        bad = [(w, v) for w, v in measured if v > 1.0]
        worst = max(measured, key=lambda x: x[1])
    else:
        bad = [(w, v) for w, v in measured if v < th]
        worst = min(measured, key=lambda x: x[1])
    missing = len(vals) - len(measured)
    verdict = "MISS" if bad else ("PASS" if not missing else "PASS (measured rows)")
    detail = f"worst {worst[1]:.2f}x, {worst[0]}"
    if bad:
        detail = f"{len(bad)} of {len(measured)} rows: " + ", ".join(f"{w} {v:.2f}x" for w, v in bad)
    if missing:
        detail += f"; {missing} row{'s' if missing > 1 else ''} not measured"
    print(f"- {what}: {verdict} ({detail})")
PY
