// Package rbdvm holds the tests of hemd's volumes on Ceph RBD that boot VMs
// or run the hemd command: they start their own one-node cluster
// (storage/rbd/cephtest) once for the package, and reuse package vmtest's
// guests, QEMU harness and soak agent.
package rbdvm
