#!/usr/bin/env bash
# bench-xts.sh: hem's AES-256-XTS against golang.org/x/crypto/xts and OpenSSL
# (openssl speed -evp aes-256-xts) on 4 KiB data units, one core, from one run.
# Prints the median GB/s of each and the ratios. Knobs: COUNT (benchmark
# repetitions, default 5), BENCHTIME (per repetition, default 1s).
set -euo pipefail
cd "$(dirname "$0")/.."
count=${COUNT:-5}
benchtime=${BENCHTIME:-1s}

command -v openssl >/dev/null || { echo "bench-xts: openssl not installed (apt-get install openssl)" >&2; exit 1; }

osslspeed() {
	openssl speed -seconds 3 -evp aes-256-xts -bytes 4096 2>/dev/null |
		awk '/^AES-256-XTS/ { v = $NF; sub(/k$/, "", v); printf "%.3f", v * 1000 / 1e9 }'
}

# OpenSSL runs before and after the Go benchmarks; the higher figure counts
# (the conservative choice for hem's ratios).
echo "# openssl speed -seconds 3 -evp aes-256-xts -bytes 4096   ($(openssl version)), before and after:"
ossl1=$(osslspeed)
echo "# go test -run '^\$' -bench 'BenchmarkXTS/.*/4096\$' -benchtime $benchtime -count $count ./hem/   (GOMAXPROCS=1)"
gobench=$(GOMAXPROCS=1 go test -run '^$' -bench 'BenchmarkXTS/[^/]+/4096$' -benchtime "$benchtime" -count "$count" ./hem/)
ossl2=$(osslspeed)
echo "# openssl: $ossl1 GB/s before, $ossl2 GB/s after"
ossl=$(awk -v a="${ossl1:-0}" -v b="${ossl2:-0}" 'BEGIN { print (a > b ? a : b) }')
awk -v o="$ossl" 'BEGIN { exit !(o > 0) }' || { echo "bench-xts: could not parse openssl speed output" >&2; exit 1; }

# Median MB/s per benchmark name, as GB/s.
medians=$(printf '%s\n' "$gobench" | awk '
	/^BenchmarkXTS\// {
		name = $1; sub(/^BenchmarkXTS\//, "", name); sub(/\/4096(-[0-9]+)?$/, "", name)
		for (i = 2; i < NF; i++) if ($(i+1) == "MB/s") v[name] = v[name] " " $i
	}
	END {
		for (n in v) {
			k = split(substr(v[n], 2), a, " ")
			for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
			m = (k % 2) ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
			printf "%s %.3f\n", n, m / 1000
		}
	}' | sort)

xc=$(printf '%s\n' "$medians" | awk '$1 == "xcrypto" { print $2 }')
best=$(printf '%s\n' "$medians" | awk '$1 != "xcrypto" && $1 != "generic" && $2 > b { b = $2; n = $1 } END { print n }')

printf '\n%-22s %10s %12s %12s\n' "AES-256-XTS, 4 KiB" "GB/s" "vs openssl" "vs xcrypto"
printf '%s\n' "$medians" | while read -r name gbs; do
	[ "$name" = xcrypto ] && continue
	mark=""; [ "$name" = "$best" ] && mark=" (best)"
	awk -v n="hem $name$mark" -v g="$gbs" -v o="$ossl" -v x="$xc" 'BEGIN { printf "%-22s %10.2f %11.2fx %11.1fx\n", n, g, g / o, g / x }'
done
awk -v g="$xc" -v o="$ossl" 'BEGIN { printf "%-22s %10.2f %11.2fx %11.1fx\n", "x/crypto/xts", g, g / o, 1 }'
awk -v o="$ossl" -v x="$xc" 'BEGIN { printf "%-22s %10.2f %11.2fx %11.1fx\n", "openssl speed", o, 1, o / x }'

bestg=$(printf '%s\n' "$medians" | awk -v n="$best" '$1 == n { print $2 }')
aesni=$(printf '%s\n' "$medians" | awk '$1 == "aesni" { print $2 }')
echo
awk -v b="$bestg" -v n="$best" -v a="${aesni:-0}" -v o="$ossl" -v x="$xc" 'BEGIN {
	printf "target: hem %s >= 2.0x openssl: %.2fx %s\n", n, b / o, (b / o >= 2.0 ? "met" : "NOT met")
	if (a > 0) printf "target: hem aesni >= 1.0x openssl: %.2fx %s\n", a / o, (a / o >= 1.0 ? "met" : "NOT met")
	printf "target: hem %s >= 20x x/crypto/xts: %.1fx %s\n", n, b / x, (b / x >= 20 ? "met" : "NOT met")
}'
