//go:build !cgo || norbd

package main

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/hemd/hemd/hem/volume"
	"github.com/hemd/hemd/storage/rbd"
	"github.com/hemd/hemd/vhost/blk"
)

// This hemd was built without Ceph RBD (-tags norbd, or without cgo): a
// volume named rbd:… is refused, saying so.

// rbdBuilt says this hemd can serve volumes on Ceph RBD.
const rbdBuilt = false

func rbdLocate(n rbd.Name, _ rbd.Cluster) (volume.Location, error) {
	return nil, fmt.Errorf("%s: %w", n, rbd.ErrNotBuilt)
}

func openRBDBacking(_ context.Context, v volumeConfig, _ string, _ *slog.Logger) (backing, claim, error) {
	return nil, nil, fmt.Errorf("%s: %w", v.Path, rbd.ErrNotBuilt)
}

func rbdSection(backing, int64, int64) (blk.Store, bool, error) { return nil, false, nil }

func rbdSnapshot(_ context.Context, n rbd.Name, _ rbd.Cluster, _ string) (rbd.Name, *volume.Header, error) {
	return rbd.Name{}, nil, fmt.Errorf("%s: %w", n, rbd.ErrNotBuilt)
}

func rbdSnapshotCopy(loc volume.Location, _ string) (string, error) { return loc.String(), nil }
