package vhost

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/hemd/hemd/vhost/guestmem"
	"github.com/hemd/hemd/vhost/virtq"
)

// Request is a vhost-user front-end request code, numbered as in QEMU's
// docs/interop/vhost-user.rst.
type Request uint32

// Front-end request codes.
const (
	ReqGetFeatures         Request = 1  // get the device's virtio features
	ReqSetFeatures         Request = 2  // ack a subset of them
	ReqSetOwner            Request = 3  // claim the session
	ReqResetOwner          Request = 4  // deprecated: reset the device
	ReqSetMemTable         Request = 5  // replace the guest memory map (one fd per region)
	ReqSetLogBase          Request = 6  // dirty log region (migration)
	ReqSetLogFd            Request = 7  // dirty log eventfd (migration)
	ReqSetVringNum         Request = 8  // queue size
	ReqSetVringAddr        Request = 9  // ring addresses in the front-end's address space
	ReqSetVringBase        Request = 10 // next available index
	ReqGetVringBase        Request = 11 // stop the ring, return the next available index
	ReqSetVringKick        Request = 12 // kick eventfd (or polling)
	ReqSetVringCall        Request = 13 // call eventfd (or none)
	ReqSetVringErr         Request = 14 // error eventfd (or none)
	ReqGetProtocolFeatures Request = 15 // get vhost-user protocol features
	ReqSetProtocolFeatures Request = 16 // ack a subset of them
	ReqGetQueueNum         Request = 17 // most queues the device supports
	ReqSetVringEnable      Request = 18 // enable or disable one ring
	ReqSendRarp            Request = 19 // net only
	ReqNetSetMtu           Request = 20 // net only
	ReqSetBackendReqFd     Request = 21 // back-end initiated channel
	ReqIotlbMsg            Request = 22 // IOMMU
	ReqSetVringEndian      Request = 23 // legacy endianness
	ReqGetConfig           Request = 24 // read device config space
	ReqSetConfig           Request = 25 // write device config space
	ReqCreateCryptoSession Request = 26 // crypto only
	ReqCloseCryptoSession  Request = 27 // crypto only
	ReqPostcopyAdvise      Request = 28 // postcopy migration
	ReqPostcopyListen      Request = 29 // postcopy migration
	ReqPostcopyEnd         Request = 30 // postcopy migration
	ReqGetInflightFd       Request = 31 // inflight tracking region
	ReqSetInflightFd       Request = 32 // inflight tracking region after reconnect
	ReqGpuSetSocket        Request = 33 // gpu only
	ReqResetDevice         Request = 34 // reset all device state
	ReqVringKick           Request = 35 // in-band kick
	ReqGetMaxMemSlots      Request = 36 // most memory regions the back-end maps
	ReqAddMemReg           Request = 37 // add one memory region
	ReqRemMemReg           Request = 38 // remove one memory region
	ReqSetStatus           Request = 39 // virtio device status
	ReqGetStatus           Request = 40 // virtio device status
)

// BackendRequest is a request the back-end sends the front-end on the
// back-end channel (SET_BACKEND_REQ_FD), numbered as in vhost-user.rst.
type BackendRequest uint32

// Back-end request codes.
const (
	BackendIotlbMsg     BackendRequest = 1 // IOMMU
	BackendConfigChange BackendRequest = 2 // the device's config space changed: read it again
)

var reqNames = map[Request]string{
	ReqGetFeatures: "GET_FEATURES", ReqSetFeatures: "SET_FEATURES", ReqSetOwner: "SET_OWNER",
	ReqResetOwner: "RESET_OWNER", ReqSetMemTable: "SET_MEM_TABLE", ReqSetLogBase: "SET_LOG_BASE",
	ReqSetLogFd: "SET_LOG_FD", ReqSetVringNum: "SET_VRING_NUM", ReqSetVringAddr: "SET_VRING_ADDR",
	ReqSetVringBase: "SET_VRING_BASE", ReqGetVringBase: "GET_VRING_BASE", ReqSetVringKick: "SET_VRING_KICK",
	ReqSetVringCall: "SET_VRING_CALL", ReqSetVringErr: "SET_VRING_ERR",
	ReqGetProtocolFeatures: "GET_PROTOCOL_FEATURES", ReqSetProtocolFeatures: "SET_PROTOCOL_FEATURES",
	ReqGetQueueNum: "GET_QUEUE_NUM", ReqSetVringEnable: "SET_VRING_ENABLE", ReqSendRarp: "SEND_RARP",
	ReqNetSetMtu: "NET_SET_MTU", ReqSetBackendReqFd: "SET_BACKEND_REQ_FD", ReqIotlbMsg: "IOTLB_MSG",
	ReqSetVringEndian: "SET_VRING_ENDIAN", ReqGetConfig: "GET_CONFIG", ReqSetConfig: "SET_CONFIG",
	ReqCreateCryptoSession: "CREATE_CRYPTO_SESSION", ReqCloseCryptoSession: "CLOSE_CRYPTO_SESSION",
	ReqPostcopyAdvise: "POSTCOPY_ADVISE", ReqPostcopyListen: "POSTCOPY_LISTEN", ReqPostcopyEnd: "POSTCOPY_END",
	ReqGetInflightFd: "GET_INFLIGHT_FD", ReqSetInflightFd: "SET_INFLIGHT_FD", ReqGpuSetSocket: "GPU_SET_SOCKET",
	ReqResetDevice: "RESET_DEVICE", ReqVringKick: "VRING_KICK", ReqGetMaxMemSlots: "GET_MAX_MEM_SLOTS",
	ReqAddMemReg: "ADD_MEM_REG", ReqRemMemReg: "REM_MEM_REG", ReqSetStatus: "SET_STATUS", ReqGetStatus: "GET_STATUS",
}

func (r Request) String() string {
	if n, ok := reqNames[r]; ok {
		return n
	}
	return fmt.Sprintf("request(%d)", uint32(r))
}

// Header flags.
const (
	flagVersionMask = 0x3
	flagVersion     = 0x1
	flagReply       = 0x4
	flagNeedReply   = 0x8
)

// Sizes on the wire.
const (
	headerSize     = 12
	maxPayloadSize = 4096
	maxFds         = 8   // VHOST_MEMORY_BASELINE_NREGIONS
	maxConfigSize  = 256 // VHOST_USER_MAX_CONFIG_SIZE
	regionSize     = 32
)

// Virtio and vhost feature bits.
const (
	FeatIndirectDesc     = 1 << 28
	FeatEventIdx         = 1 << 29
	FeatProtocolFeatures = 1 << 30 // VHOST_USER_F_PROTOCOL_FEATURES
	FeatVersion1         = 1 << 32
	FeatLogAll           = 1 << 26 // VHOST_F_LOG_ALL
)

// Protocol feature bits.
const (
	ProtoMQ                = 1 << 0
	ProtoLogShmfd          = 1 << 1
	ProtoReplyAck          = 1 << 3
	ProtoBackendReq        = 1 << 5 // QEMU 7.2 calls it SLAVE_REQ
	ProtoConfig            = 1 << 9
	ProtoInflightShmfd     = 1 << 12
	ProtoResetDevice       = 1 << 13
	ProtoConfigureMemSlots = 1 << 15
)

// vring fd payload bits (SET_VRING_KICK/CALL/ERR).
const (
	vringIndexMask = 0xff
	vringNoFd      = 1 << 8
)

// Errors in a front-end message. Each ends the session: the frontend sent
// something the protocol does not allow.
var (
	ErrBadVersion     = errors.New("unsupported message version")
	ErrPayloadSize    = errors.New("wrong payload size")
	ErrPayloadTooBig  = errors.New("payload larger than any message")
	ErrFdCount        = errors.New("wrong number of file descriptors")
	ErrFdKind         = errors.New("file descriptor of the wrong kind")
	ErrUnknownRequest = errors.New("unknown or unsupported request")
	ErrQueueIndex     = errors.New("queue index out of range")
	ErrFeatures       = errors.New("features not offered")
	ErrNotOwner       = errors.New("request before SET_OWNER")
	ErrRingRunning    = errors.New("ring is running")
	ErrConfigRange    = errors.New("config access out of range")
	ErrRegionCount    = errors.New("bad number of memory regions")
)

// header is the 12-byte message header.
type header struct {
	Request Request
	Flags   uint32
	Size    uint32
}

func (h header) needReply() bool { return h.Flags&flagNeedReply != 0 }

func decodeHeader(b []byte) (header, error) {
	h := header{
		Request: Request(binary.LittleEndian.Uint32(b[0:])),
		Flags:   binary.LittleEndian.Uint32(b[4:]),
		Size:    binary.LittleEndian.Uint32(b[8:]),
	}
	if h.Flags&flagVersionMask != flagVersion {
		return h, fmt.Errorf("%w: flags %#x", ErrBadVersion, h.Flags)
	}
	if h.Flags&flagReply != 0 {
		return h, fmt.Errorf("%w: reply flag set on a request", ErrBadVersion)
	}
	if h.Size > maxPayloadSize {
		return h, fmt.Errorf("%w: %d bytes", ErrPayloadTooBig, h.Size)
	}
	return h, nil
}

// message is one decoded front-end request with its payload and fds.
type message struct {
	header
	payload []byte
	fds     []int
}

// rule says what one request carries: its payload size (exact, or a
// minimum when variable) and how many fds it may bring.
type rule struct {
	size     int
	variable bool // size is a minimum
	minFds   int
	maxFds   int
}

var rules = map[Request]rule{
	ReqGetFeatures:         {size: 0},
	ReqSetFeatures:         {size: 8},
	ReqSetOwner:            {size: 0},
	ReqResetOwner:          {size: 0},
	ReqSetMemTable:         {size: 8, variable: true, minFds: 1, maxFds: maxFds},
	ReqSetVringNum:         {size: 8},
	ReqSetVringAddr:        {size: 40},
	ReqSetVringBase:        {size: 8},
	ReqGetVringBase:        {size: 8},
	ReqSetVringKick:        {size: 8, maxFds: 1},
	ReqSetVringCall:        {size: 8, maxFds: 1},
	ReqSetVringErr:         {size: 8, maxFds: 1},
	ReqGetProtocolFeatures: {size: 0},
	ReqSetProtocolFeatures: {size: 8},
	ReqGetQueueNum:         {size: 0},
	ReqSetVringEnable:      {size: 8},
	ReqGetConfig:           {size: 12, variable: true},
	ReqSetConfig:           {size: 12, variable: true},
	ReqResetDevice:         {size: 0},
	ReqGetMaxMemSlots:      {size: 0},
	ReqAddMemReg:           {size: 8 + regionSize, minFds: 1, maxFds: 1},
	ReqRemMemReg:           {size: 8 + regionSize, maxFds: 1},
	ReqSetLogBase:          {size: 16, minFds: 1, maxFds: 1},
	ReqSetLogFd:            {size: 0, variable: true, maxFds: 1},
	ReqGetInflightFd:       {size: inflightMinMsg, variable: true},
	ReqSetInflightFd:       {size: inflightMinMsg, variable: true, minFds: 1, maxFds: 1},
	ReqSetBackendReqFd:     {size: 0, minFds: 1, maxFds: 1},
}

// check validates a message's size and fd count against its request's rule.
func (m *message) check() error {
	r, ok := rules[m.Request]
	if !ok {
		return ErrUnknownRequest
	}
	n := len(m.payload)
	if (!r.variable && n != r.size) || (r.variable && n < r.size) {
		return fmt.Errorf("%w: %d bytes, want %d", ErrPayloadSize, n, r.size)
	}
	if len(m.fds) < r.minFds || len(m.fds) > r.maxFds {
		return fmt.Errorf("%w: %d, want %d..%d", ErrFdCount, len(m.fds), r.minFds, r.maxFds)
	}
	return nil
}

func (m *message) u64() uint64 { return binary.LittleEndian.Uint64(m.payload) }

// vringState is the payload of SET_VRING_NUM/BASE, GET_VRING_BASE and SET_VRING_ENABLE.
type vringState struct {
	Index uint32
	Num   uint32
}

func (m *message) vringState() vringState {
	return vringState{binary.LittleEndian.Uint32(m.payload[0:]), binary.LittleEndian.Uint32(m.payload[4:])}
}

func (s vringState) encode() []byte {
	b := make([]byte, 8)
	binary.LittleEndian.PutUint32(b[0:], s.Index)
	binary.LittleEndian.PutUint32(b[4:], s.Num)
	return b
}

// vringAddr is the payload of SET_VRING_ADDR.
type vringAddr struct {
	Index uint32
	Flags uint32 // bit 0: log used-ring writes
	virtq.Addrs
	Log uint64
}

func (m *message) vringAddr() vringAddr {
	p := m.payload
	return vringAddr{
		Index: binary.LittleEndian.Uint32(p[0:]),
		Flags: binary.LittleEndian.Uint32(p[4:]),
		Addrs: virtq.Addrs{
			Desc:  binary.LittleEndian.Uint64(p[8:]),
			Used:  binary.LittleEndian.Uint64(p[16:]),
			Avail: binary.LittleEndian.Uint64(p[24:]),
		},
		Log: binary.LittleEndian.Uint64(p[32:]),
	}
}

func decodeRegion(p []byte) guestmem.Region {
	return guestmem.Region{
		GuestPhysAddr: binary.LittleEndian.Uint64(p[0:]),
		Size:          binary.LittleEndian.Uint64(p[8:]),
		UserAddr:      binary.LittleEndian.Uint64(p[16:]),
		MmapOffset:    binary.LittleEndian.Uint64(p[24:]),
	}
}

// memTable decodes SET_MEM_TABLE: u32 count, u32 padding, count regions.
func (m *message) memTable() ([]guestmem.Region, error) {
	n := binary.LittleEndian.Uint32(m.payload[0:])
	if n == 0 || n > maxFds {
		return nil, fmt.Errorf("%w: %d", ErrRegionCount, n)
	}
	if len(m.payload) != 8+int(n)*regionSize {
		return nil, fmt.Errorf("%w: %d bytes for %d regions", ErrPayloadSize, len(m.payload), n)
	}
	if int(n) != len(m.fds) {
		return nil, fmt.Errorf("%w: %d regions but %d fds", ErrFdCount, n, len(m.fds))
	}
	rs := make([]guestmem.Region, n)
	for i := range rs {
		rs[i] = decodeRegion(m.payload[8+i*regionSize:])
	}
	return rs, nil
}

// configMsg is the payload of GET_CONFIG and SET_CONFIG.
type configMsg struct {
	Offset, Size, Flags uint32
	Data                []byte
}

func (m *message) config() (configMsg, error) {
	p := m.payload
	c := configMsg{
		Offset: binary.LittleEndian.Uint32(p[0:]),
		Size:   binary.LittleEndian.Uint32(p[4:]),
		Flags:  binary.LittleEndian.Uint32(p[8:]),
		Data:   p[12:],
	}
	if c.Size > maxConfigSize || c.Offset > maxConfigSize || c.Offset+c.Size > maxConfigSize {
		return c, fmt.Errorf("%w: offset %d size %d", ErrConfigRange, c.Offset, c.Size)
	}
	if int(c.Size) != len(c.Data) {
		return c, fmt.Errorf("%w: config size %d but %d bytes follow", ErrPayloadSize, c.Size, len(c.Data))
	}
	return c, nil
}

func (c configMsg) encode() []byte {
	b := make([]byte, 12+len(c.Data))
	binary.LittleEndian.PutUint32(b[0:], c.Offset)
	binary.LittleEndian.PutUint32(b[4:], c.Size)
	binary.LittleEndian.PutUint32(b[8:], c.Flags)
	copy(b[12:], c.Data)
	return b
}

func u64(v uint64) []byte {
	b := make([]byte, 8)
	binary.LittleEndian.PutUint64(b, v)
	return b
}
