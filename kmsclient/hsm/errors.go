package hsm

import "fmt"

// Error is a KMS error named as AWS KMS names it (its __type).
type Error struct {
	Type    string // NotFoundException, DisabledException, ...
	Message string
}

func (e *Error) Error() string { return e.Type + ": " + e.Message }

// Is matches errors of the same Type, so errors.Is(err, ErrDisabled) works.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Type == e.Type && (t.Message == "" || t.Message == e.Message)
}

// Sentinels for errors.Is.
var (
	ErrNotFound          = &Error{Type: "NotFoundException"}
	ErrDisabled          = &Error{Type: "DisabledException"}
	ErrInvalidState      = &Error{Type: "KMSInvalidStateException"}
	ErrInvalidCiphertext = &Error{Type: "InvalidCiphertextException"}
	ErrValidation        = &Error{Type: "ValidationException"}
	ErrAlreadyExists     = &Error{Type: "AlreadyExistsException"}
	ErrInternal          = &Error{Type: "KMSInternalException"}
	ErrIncorrectKey      = &Error{Type: "IncorrectKeyException"}
	ErrAccessDenied      = &Error{Type: "AccessDeniedException"}
)

func kmsErr(kind *Error, format string, a ...any) error {
	return &Error{Type: kind.Type, Message: fmt.Sprintf(format, a...)}
}
