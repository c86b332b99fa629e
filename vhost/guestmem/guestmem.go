// Package guestmem maps a vhost-user frontend's guest memory regions into this
// process and translates guest-physical and frontend-virtual addresses into
// bounds-checked byte slices.
package guestmem

import (
	"errors"
	"fmt"
	"sort"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Region describes one shared-memory region as the frontend sends it.
type Region struct {
	GuestPhysAddr uint64 // guest physical address of the region's first byte
	Size          uint64 // length of the region in bytes
	UserAddr      uint64 // the frontend's own virtual address of the first byte
	MmapOffset    uint64 // offset of the first byte in the file descriptor
}

// End returns the guest physical address one past the region, and false if
// the region wraps the address space.
func (r Region) End() (uint64, bool) {
	e := r.GuestPhysAddr + r.Size
	return e, e >= r.GuestPhysAddr
}

// Errors returned by translation and mapping.
var (
	ErrNotMapped    = errors.New("address not in guest memory")
	ErrBadRegion    = errors.New("bad memory region")
	ErrOverlap      = errors.New("memory regions overlap")
	ErrTooManySlots = errors.New("too many memory regions")
)

// mapping is one mmapped region.
type mapping struct {
	Region
	mem  []byte // the whole mmap, from file offset 0
	data []byte // mem[MmapOffset : MmapOffset+Size]
}

// Table is an immutable set of mapped regions. Translation never allocates.
// A Table is shared read-only between queue goroutines; the owner replaces it
// (copy on write) and unmaps the old one only after every user has let go.
type Table struct {
	maps []*mapping // sorted by GuestPhysAddr
}

// MaxRegions is the most regions a table holds (GET_MAX_MEM_SLOTS).
const MaxRegions = 509

// Map mmaps fd for r and returns the mapped region. The caller keeps
// ownership of fd (it may close it after Map returns).
func mapRegion(r Region, fd int) (*mapping, error) {
	if r.Size == 0 {
		return nil, fmt.Errorf("%w: zero size", ErrBadRegion)
	}
	if _, ok := r.End(); !ok {
		return nil, fmt.Errorf("%w: guest range %#x+%#x wraps", ErrBadRegion, r.GuestPhysAddr, r.Size)
	}
	if r.UserAddr+r.Size < r.UserAddr {
		return nil, fmt.Errorf("%w: frontend range %#x+%#x wraps", ErrBadRegion, r.UserAddr, r.Size)
	}
	total := r.MmapOffset + r.Size
	if total < r.Size || total > 1<<47 {
		return nil, fmt.Errorf("%w: mmap offset %#x + size %#x too large", ErrBadRegion, r.MmapOffset, r.Size)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("%w: fstat region fd: %v", ErrBadRegion, err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFREG && uint64(st.Size) < total {
		return nil, fmt.Errorf("%w: region ends at %#x but its file has %#x bytes", ErrBadRegion, total, st.Size)
	}
	mem, err := unix.Mmap(fd, 0, int(total), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("%w: mmap %#x bytes: %v", ErrBadRegion, total, err)
	}
	// Guest memory must never reach a core dump of hemd or a forked child.
	_ = unix.Madvise(mem, unix.MADV_DONTDUMP)
	_ = unix.Madvise(mem, unix.MADV_DONTFORK)
	return &mapping{Region: r, mem: mem, data: mem[r.MmapOffset:total]}, nil
}

func (m *mapping) unmap() {
	if m.mem != nil {
		_ = unix.Munmap(m.mem)
		m.mem, m.data = nil, nil
	}
}

// NewTable maps every region (fds[i] backs regions[i]) into a new table.
// On error nothing stays mapped.
func NewTable(regions []Region, fds []int) (*Table, error) {
	if len(regions) != len(fds) {
		return nil, fmt.Errorf("%w: %d regions but %d file descriptors", ErrBadRegion, len(regions), len(fds))
	}
	if len(regions) > MaxRegions {
		return nil, fmt.Errorf("%w: %d > %d", ErrTooManySlots, len(regions), MaxRegions)
	}
	t := &Table{}
	for i, r := range regions {
		m, err := mapRegion(r, fds[i])
		if err != nil {
			t.Unmap()
			return nil, fmt.Errorf("region %d: %w", i, err)
		}
		t.maps = append(t.maps, m)
	}
	if err := t.sortAndCheck(); err != nil {
		t.Unmap()
		return nil, err
	}
	return t, nil
}

func (t *Table) sortAndCheck() error {
	sort.Slice(t.maps, func(i, j int) bool { return t.maps[i].GuestPhysAddr < t.maps[j].GuestPhysAddr })
	for i := 1; i < len(t.maps); i++ {
		prevEnd, _ := t.maps[i-1].End()
		if t.maps[i].GuestPhysAddr < prevEnd {
			return fmt.Errorf("%w: %#x+%#x and %#x+%#x", ErrOverlap,
				t.maps[i-1].GuestPhysAddr, t.maps[i-1].Size, t.maps[i].GuestPhysAddr, t.maps[i].Size)
		}
	}
	return nil
}

// With returns a new table holding t's regions plus r (ADD_MEM_REG). The new
// table shares t's mappings; t must then be dropped with Release, not Unmap.
func (t *Table) With(r Region, fd int) (*Table, error) {
	if t != nil && len(t.maps) >= MaxRegions {
		return nil, fmt.Errorf("%w: table already holds %d", ErrTooManySlots, len(t.maps))
	}
	m, err := mapRegion(r, fd)
	if err != nil {
		return nil, err
	}
	nt := &Table{}
	if t != nil {
		nt.maps = append(nt.maps, t.maps...)
	}
	nt.maps = append(nt.maps, m)
	if err := nt.sortAndCheck(); err != nil {
		m.unmap()
		return nil, err
	}
	return nt, nil
}

// Without returns a new table without the region that matches r's guest
// address, size and frontend address (REM_MEM_REG), and the removed mapping's
// unmap function, to call once no queue uses t any more.
func (t *Table) Without(r Region) (*Table, func(), error) {
	if t == nil {
		return nil, nil, fmt.Errorf("%w: no memory table", ErrNotMapped)
	}
	nt := &Table{}
	var gone *mapping
	for _, m := range t.maps {
		if gone == nil && m.GuestPhysAddr == r.GuestPhysAddr && m.Size == r.Size && m.UserAddr == r.UserAddr {
			gone = m
			continue
		}
		nt.maps = append(nt.maps, m)
	}
	if gone == nil {
		return nil, nil, fmt.Errorf("%w: no region at %#x+%#x to remove", ErrNotMapped, r.GuestPhysAddr, r.Size)
	}
	return nt, gone.unmap, nil
}

// Unmap releases every mapping of the table. No slice obtained from it may be
// used afterwards.
func (t *Table) Unmap() {
	if t == nil {
		return
	}
	for _, m := range t.maps {
		m.unmap()
	}
	t.maps = nil
}

// Len returns the number of regions.
func (t *Table) Len() int {
	if t == nil {
		return 0
	}
	return len(t.maps)
}

// Regions returns a copy of the region descriptions, sorted by guest address.
func (t *Table) Regions() []Region {
	if t == nil {
		return nil
	}
	out := make([]Region, len(t.maps))
	for i, m := range t.maps {
		out[i] = m.Region
	}
	return out
}

// Slice returns the guest memory [gpa, gpa+n) as one slice. The range must lie
// inside a single region.
func (t *Table) Slice(gpa, n uint64) ([]byte, error) {
	if t != nil {
		// Few regions (QEMU sends 1 to 4): a linear scan beats a binary search.
		for _, m := range t.maps {
			if gpa >= m.GuestPhysAddr && gpa-m.GuestPhysAddr < m.Size {
				off := gpa - m.GuestPhysAddr
				if n > m.Size-off {
					return nil, fmt.Errorf("%w: %#x+%#x crosses the end of region %#x+%#x",
						ErrNotMapped, gpa, n, m.GuestPhysAddr, m.Size)
				}
				return m.data[off : off+n : off+n], nil
			}
		}
	}
	return nil, fmt.Errorf("%w: %#x+%#x", ErrNotMapped, gpa, n)
}

// UserSlice is Slice for an address in the frontend's virtual address space,
// as SET_VRING_ADDR sends them.
func (t *Table) UserSlice(uva, n uint64) ([]byte, error) {
	if t != nil {
		for _, m := range t.maps {
			if uva >= m.UserAddr && uva-m.UserAddr < m.Size {
				off := uva - m.UserAddr
				if n > m.Size-off {
					return nil, fmt.Errorf("%w: frontend address %#x+%#x crosses the end of its region",
						ErrNotMapped, uva, n)
				}
				return m.data[off : off+n : off+n], nil
			}
		}
	}
	return nil, fmt.Errorf("%w: frontend address %#x+%#x", ErrNotMapped, uva, n)
}

// Locate names the region whose mapping holds the process address addr (a
// fault's address), and reports whether one does.
func (t *Table) Locate(addr uintptr) (string, bool) {
	if t == nil {
		return "", false
	}
	for i, m := range t.maps {
		if len(m.mem) == 0 {
			continue
		}
		base := uintptr(unsafe.Pointer(&m.mem[0]))
		if addr >= base && addr-base < uintptr(len(m.mem)) {
			off := uint64(addr - base)
			return fmt.Sprintf("guest memory region %d (guest %#x+%#x, file offset %#x; fault at file offset %#x)",
				i, m.GuestPhysAddr, m.Size, m.MmapOffset, off), true
		}
	}
	return "", false
}

// UserToGuest translates a frontend virtual address to a guest physical one.
func (t *Table) UserToGuest(uva uint64) (uint64, bool) {
	if t != nil {
		for _, m := range t.maps {
			if uva >= m.UserAddr && uva-m.UserAddr < m.Size {
				return m.GuestPhysAddr + (uva - m.UserAddr), true
			}
		}
	}
	return 0, false
}
