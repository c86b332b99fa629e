// C side of package rbd (cgo && !norbd).
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <rbd/librbd.h>

// hemd_op is one transfer of a batch.
typedef struct hemd_op {
	int write;
	uint64_t off;
	struct iovec *iov;
	int iovcnt;
	rbd_completion_t c;
	ssize_t ret; // bytes transferred, or -errno
} hemd_op;

void hemd_run(rbd_image_t img, hemd_op *ops, int n);

typedef struct hemd_extent {
	uint64_t off, len;
} hemd_extent;

typedef struct hemd_extents {
	hemd_extent *e;
	size_t n, cap;
} hemd_extents;
