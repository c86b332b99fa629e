#!/usr/bin/env bash
# bench-scale.sh: `make bench-scale`. N volumes (default 8), one queue each,
# driven together by N `hemd bench` processes at once, served three ways:
#   hemd-1proc  one hemd process serving all N volumes (hemd serve --config,
#               one [[volume]] each)
#   hemd-nproc  N hemd processes, one volume each
#   qsd-nproc   N qemu-storage-daemon processes, one vhost-user-blk export each,
#               a raw file with aio=io_uring (cache.direct=off; on with DIRECT=1)
# hemd serves encrypted volumes (AES-256-XTS, key from the embedded KMS), or
# raw files with ENC=0. Every back-end process runs side by side; each
# workload runs on each way in turn, the order rotated from one workload and
# round to the next. It prints (and writes to DIR/summary.md) per workload and
# way the aggregate IOPS (the sum over the N volumes), the slowest and
# fastest volume, the CPU seconds the back-end processes used while the N
# benches ran (utime + stime from /proc/PID/stat) and that per million I/Os:
# medians over ROUNDS rounds, each round's aggregate IOPS listed.
# Knobs: N (default 8), SIZE per volume (default 256M), RUNTIME (default 5s),
# ROUNDS (default 3), DIR (default build/bench-scale), MODES (default
# "hemd-1proc hemd-nproc qsd-nproc"), WORKLOADS (default
# "randread 4k 32,randwrite 4k 32": "rw bs depth" entries separated by
# commas), ENC (default 1), DIRECT=1 (O_DIRECT: hemd direct, qsd
# cache.direct=on), FILL_BS (default 4k: each disk is written whole first),
# HEMD (the hemd binary, default build/hemd).
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${N:-8}
size=${SIZE:-256M}
runtime=${RUNTIME:-5s}
rounds=${ROUNDS:-3}
dir=${DIR:-$PWD/build/bench-scale}
enc=${ENC:-1}
direct=${DIRECT:-0}
fill_bs=${FILL_BS:-4k}
read -r -a modes <<<"${MODES:-hemd-1proc hemd-nproc qsd-nproc}"
IFS=, read -r -a workloads <<<"${WORKLOADS:-randread 4k 32,randwrite 4k 32}"
hemd=$(realpath "${HEMD:-build/hemd}")
hemd_direct=false qsd_cache=off
if [ "$direct" = 1 ]; then hemd_direct=true qsd_cache=on; fi
for m in "${modes[@]}"; do
	case $m in
	hemd-1proc | hemd-nproc | qsd-nproc) ;;
	*)
		echo "bench-scale: unknown mode $m (hemd-1proc, hemd-nproc or qsd-nproc)" >&2
		exit 2
		;;
	esac
done
mkdir -p "$dir"
rm -f "$dir"/*.img "$dir"/*.sock "$dir"/*.json "$dir"/*.log "$dir"/*.toml "$dir"/*.pids "$dir"/runs.tsv "$dir"/settings.tsv "$dir"/summary.md
export HEMD_STATE_DIR=$dir/state

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# waitsock waits for socket $1 of back-end process $2 (its log in $3).
waitsock() {
	for _ in $(seq 400); do
		[ -S "$1" ] && return 0
		kill -0 "$2" 2>/dev/null || break
		sleep 0.05
	done
	echo "bench-scale: $1 did not appear; $3:" >&2
	tail -20 "$3" >&2
	exit 1
}

# cpu_ticks prints the CPU time (utime + stime, in clock ticks) that the
# processes $@ used so far, all their threads included.
cpu_ticks() {
	local t=0 p s f
	for p; do
		s=$(<"/proc/$p/stat")
		read -r -a f <<<"${s##*) }" # fields from the 3rd (state) on: utime is the 14th, stime the 15th
		t=$((t + f[11] + f[12]))
	done
	echo "$t"
}

# volume makes the disk image $1 that hemd serves: an encrypted volume (ENC=1) or a raw file.
volume() {
	if [ "$enc" = 1 ]; then
		"$hemd" volume create --size "$size" --key alias/hemd-bench "$1" >/dev/null
	else
		truncate -s "$size" "$1"
	fi
}

# start_mode starts way $1's back-end processes, their pids in DIR/$1.pids,
# and writes each of its N disks whole once (reads then hit allocated blocks).
start_mode() {
	local m=$1 i p cfg fills=() mp=()
	case $m in
	hemd-1proc)
		cfg=$dir/$m.toml
		echo 'control_socket = "none"' >"$cfg"
		for i in $(seq 0 $((n - 1))); do
			volume "$dir/$m.$i.img"
			printf '\n[[volume]]\nsocket = "%s"\npath = "%s"\nqueues = 1\ndirect = %s\n' \
				"$dir/$m.$i.sock" "$dir/$m.$i.img" "$hemd_direct" >>"$cfg"
		done
		"$hemd" serve --config "$cfg" 2>"$dir/$m.log" &
		pids+=($!) mp+=($!)
		printf '%s\t%s\n' "$m" "one hemd serve --config with $n [[volume]] (queues = 1, direct = $hemd_direct), $([ "$enc" = 1 ] && echo encrypted || echo raw)" >>"$dir/settings.tsv"
		;;
	hemd-nproc)
		for i in $(seq 0 $((n - 1))); do
			volume "$dir/$m.$i.img"
			local opts=(--control none --socket "$dir/$m.$i.sock" --volume "$dir/$m.$i.img" --queues 1)
			if [ "$direct" = 1 ]; then opts+=(--direct); fi
			"$hemd" serve "${opts[@]}" 2>"$dir/$m.$i.log" &
			pids+=($!) mp+=($!)
		done
		printf '%s\t%s\n' "$m" "$n x hemd serve --control none --queues 1$([ "$direct" = 1 ] && echo ' --direct'), $([ "$enc" = 1 ] && echo encrypted || echo raw)" >>"$dir/settings.tsv"
		;;
	qsd-nproc)
		for i in $(seq 0 $((n - 1))); do
			truncate -s "$size" "$dir/$m.$i.img"
			qemu-storage-daemon --blockdev "driver=file,node-name=f0,filename=$dir/$m.$i.img,aio=io_uring,cache.direct=$qsd_cache" \
				--export "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$dir/$m.$i.sock,writable=on,num-queues=1" 2>"$dir/$m.$i.log" &
			pids+=($!) mp+=($!)
		done
		printf '%s\t%s\n' "$m" "$n x qemu-storage-daemon --blockdev driver=file,aio=io_uring,cache.direct=$qsd_cache --export type=vhost-user-blk,num-queues=1, raw" >>"$dir/settings.tsv"
		;;
	esac
	echo "${mp[*]}" >"$dir/$m.pids"
	for i in $(seq 0 $((n - 1))); do
		if [ "$m" = hemd-1proc ]; then waitsock "$dir/$m.$i.sock" "${mp[0]}" "$dir/$m.log"; else waitsock "$dir/$m.$i.sock" "${mp[$i]}" "$dir/$m.$i.log"; fi
	done
	for i in $(seq 0 $((n - 1))); do
		"$hemd" bench --socket "$dir/$m.$i.sock" --rw write --bs "$fill_bs" --depth 32 --once --runtime 600s --size "$size" --json >/dev/null &
		fills+=($!)
	done
	for p in "${fills[@]}"; do wait "$p"; done
}

started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
if [ "$enc" = 1 ]; then
	"$hemd" key describe alias/hemd-bench >/dev/null 2>&1 || "$hemd" key create --alias alias/hemd-bench >/dev/null
fi
for m in "${modes[@]}"; do
	echo "# starting $m ($n volumes of $size)" >&2
	start_mode "$m"
done

# One run: way $1, workload $2 (rw bs depth), round $3: N benches at once.
run() {
	local m=$1 rw bs qd r=$3 i c0 c1 t0 t1 benches=() fail=0
	read -r rw bs qd <<<"$2"
	local mp
	read -r -a mp <"$dir/$m.pids"
	# Every run starts with no dirty pages: writeback left by the one
	# before must not be charged to it.
	sync
	c0=$(cpu_ticks "${mp[@]}")
	t0=$(date +%s.%N)
	for i in $(seq 0 $((n - 1))); do
		"$hemd" bench --socket "$dir/$m.$i.sock" --rw "$rw" --bs "$bs" --depth "$qd" --queues 1 \
			--runtime "$runtime" --size "$size" --json >"$dir/$m.$rw.$bs.qd$qd.r$r.v$i.json" &
		benches+=($!)
	done
	for p in "${benches[@]}"; do wait "$p" || fail=1; done
	t1=$(date +%s.%N)
	c1=$(cpu_ticks "${mp[@]}")
	if [ "$fail" = 1 ]; then
		echo "bench-scale: a bench of $m $2 failed" >&2
		exit 1
	fi
	printf '%s\t%s\t%s\t%s\t%s\n' "$m" "$rw $bs $qd" "$r" "$(((c1 - c0) * 1000 / $(getconf CLK_TCK)))" "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')" >>"$dir/runs.tsv"
	echo "# round $r $m $2: $(cat "$dir/$m.$rw.$bs.qd$qd.r$r".v*.json | grep -o '"iops": [0-9.]*' | awk '{s += $2} END {printf "%.0f IOPS", s}'), back-end CPU $(((c1 - c0) * 1000 / $(getconf CLK_TCK))) ms" >&2
}

k=0
for r in $(seq 1 "$rounds"); do
	for w in "${workloads[@]}"; do
		for j in $(seq 0 $((${#modes[@]} - 1))); do
			run "${modes[$(((k + j) % ${#modes[@]}))]}" "$w" "$r"
		done
		k=$((k + 1))
	done
done

# The table, printed and written to $dir/summary.md.
BENCH_STARTED=$started BENCH_SETTINGS="N=$n SIZE=$size RUNTIME=$runtime ROUNDS=$rounds ENC=$enc DIRECT=$direct FILL_BS=$fill_bs" \
	python3 - "$dir" "$n" "${modes[*]}" "${workloads[@]}" <<'PY' | tee "$dir/summary.md"
import json, os, statistics, sys
d, n, modes, workloads = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4:]
runs = {}  # (mode, workload, round) -> (cpu seconds, wall seconds)
for line in open(os.path.join(d, "runs.tsv")):
    m, w, r, cpu_ms, wall = line.rstrip("\n").split("\t")
    runs[(m, w, int(r))] = (int(cpu_ms) / 1000, float(wall))
settings = dict(l.rstrip("\n").split("\t", 1) for l in open(os.path.join(d, "settings.tsv")))
label = {"hemd-1proc": f"one hemd, {n} volumes", "hemd-nproc": f"{n} hemds, a volume each", "qsd-nproc": f"{n} qemu-storage-daemons (aio=io_uring)"}

print(f"# make bench-scale, started {os.environ['BENCH_STARTED']}: {os.environ['BENCH_SETTINGS']}")
print()
print("| way | settings |")
print("|---|---|")
for m in modes:
    print(f"| {m}: {label[m]} | `{settings.get(m, '?')}` |")
print()

def one(m, w, r):
    rw, bs, qd = w.split()
    vols = [json.load(open(os.path.join(d, f"{m}.{rw}.{bs}.qd{qd}.r{r}.v{i}.json"))) for i in range(n)]
    cpu, wall = runs[(m, w, r)]
    ios = sum(v["ios"] for v in vols)
    return {"iops": sum(v["iops"] for v in vols), "min": min(v["iops"] for v in vols), "max": max(v["iops"] for v in vols),
            "cpu": cpu, "wall": wall, "cpu_per_mio": cpu / ios * 1e6 if ios else 0, "p99": statistics.median(v["lat_p99_us"] for v in vols)}

rounds = sorted({r for (_, _, r) in runs})
print(f"Medians of {len(rounds)} round(s); aggregate IOPS is the sum over the {n} volumes, CPU the back-end processes' while the benches ran.")
print()
print("| workload | way | aggregate IOPS | each round | slowest / fastest volume | median p99 | back-end CPU s (wall s) | CPU-s per Mio I/O |")
print("|---|---|---|---|---|---|---|---|")
med = {}
for w in workloads:
    rw, bs, qd = w.split()
    for m in modes:
        rs = [one(m, w, r) for r in rounds if (m, w, r) in runs]
        if not rs:
            continue
        md = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
        med[(m, w)] = md
        each = " / ".join(f"{x['iops']:.0f}" for x in rs)
        print(f"| {rw} {bs} QD{qd} q1 x{n} | {m} | {md['iops']:.0f} | {each} | {md['min']:.0f} / {md['max']:.0f} | {md['p99']:.0f}us | {md['cpu']:.2f} ({md['wall']:.1f}) | {md['cpu_per_mio']:.1f} |")
print()
pairs = [(a, b) for a, b in [("hemd-1proc", "qsd-nproc"), ("hemd-nproc", "qsd-nproc"), ("hemd-1proc", "hemd-nproc")] if a in modes and b in modes]
if pairs:
    print("| workload | " + " | ".join(f"{a} / {b} IOPS (CPU per I/O)" for a, b in pairs) + " |")
    print("|---" * (len(pairs) + 1) + "|")
    for w in workloads:
        rw, bs, qd = w.split()
        cells = []
        for a, b in pairs:
            x, y = med.get((a, w)), med.get((b, w))
            cells.append("-" if not x or not y else f"{x['iops'] / y['iops']:.2f}x ({x['cpu_per_mio'] / y['cpu_per_mio']:.2f}x)")
        print(f"| {rw} {bs} QD{qd} q1 x{n} | " + " | ".join(cells) + " |")
PY
