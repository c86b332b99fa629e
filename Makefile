# hemd — host encryption module for vhost-user-blk.
#   make demo   installs what is missing, builds hemd and boots a VM on it
#   make test   installs what is missing and runs every test, VM boots included

SHELL     := /bin/bash
GO        ?= go
BUILD     := build
HEMD      := $(BUILD)/hemd
# Debian packages the build, the tests and the demo need.
APT_PKGS  := qemu-system-x86 qemu-utils busybox-static cpio softhsm2 opensc \
             python3-cryptography libssl-dev openssl mmdebstrap e2fsprogs dosfstools mtools \
             systemd libvirt0 libxml2-utils awscli python3-boto3 qemu-block-extra curl \
             libvirt-daemon-system libvirt-clients
# Ceph for the RBD backend (librbd, librados and their headers: cgo) and for
# the one-node cluster the tests start; without recommends (83 packages).
CEPH_PKGS := ceph-mon ceph-mgr ceph-osd ceph-common librbd-dev librados-dev
# GOTAGS are build tags for make build: norbd builds hemd without Ceph RBD
# (no cgo, no librbd needed).
GOTAGS    ?=
FUZZTIME  ?= 60s

.PHONY: all build deps test test-unit test-vm fuzz demo bench bench-scale bench-xts vet clean

all: build

# deps installs the Debian packages that are missing (apt-get update once);
# the Ceph packages without their recommends.
deps:
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	ceph=""; for p in $(CEPH_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || ceph="$$ceph $$p"; \
	done; \
	if [ -n "$$missing$$ceph" ]; then \
	  echo "installing:$$missing$$ceph"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -q && \
	  { [ -z "$$missing" ] || DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; } && \
	  { [ -z "$$ceph" ] || DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$ceph; }; \
	fi

# build makes hemd with Ceph RBD (cgo, librbd); make build GOTAGS=norbd
# makes one without.
build:
	@mkdir -p $(BUILD)
	$(GO) build -tags '$(GOTAGS)' -o $(HEMD) ./cmd/hemd

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))" || { gofmt -l .; echo "gofmt needed"; exit 1; }

# test runs everything: unit tests under the race detector, then the tests
# that boot VMs under QEMU (the guest is built from Debian packages and
# cached under build/vmtest).
test: deps vet build test-unit test-vm

test-unit:
	$(GO) test -race -timeout 15m $$($(GO) list ./... | grep -v /vmtest)
	# The virtio-blk tests again with every queue streaming over O_DIRECT.
	$(GO) test -race -timeout 5m ./vhost/blk -args -stream

test-vm:
	$(GO) test -timeout 40m -v ./vmtest/... 2>&1 | tee $(BUILD)/vmtest.log | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic)|HEMD-RESULT|vmtest:'; \
	  exit $${PIPESTATUS[0]}

# fuzz runs every native fuzz target for FUZZTIME each.
fuzz:
	@set -e; for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz' || true); do \
	    echo "== $$pkg $$f"; \
	    $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg; \
	  done; \
	done

bench-xts:
	bash hem/bench-xts.sh

# bench: hemd encrypted and raw against qemu-storage-daemon raw and LUKS in
# each of its AIO settings (threads, io_uring; native with DIRECT=1), one
# run, same file size (SIZE=1G RUNTIME=5s by default).
bench: deps build
	bash vhost/loadgen/bench-matrix.sh

# bench-scale: 8 volumes, one queue each, driven together: one hemd serving
# all 8, 8 hemds, 8 qemu-storage-daemons with aio=io_uring
# (N=8 SIZE=256M RUNTIME=5s ROUNDS=3).
bench-scale: deps build
	bash vhost/loadgen/bench-scale.sh

demo: deps build
	$(GO) run ./vmtest/cmd/demo --hemd $(HEMD)

clean:
	rm -rf $(BUILD)
