package main

import (
	"context"
	"errors"
	"io"
)

// keyCommand runs `hemd key …`. Placeholder until the KMS work lands.
func keyCommand(ctx context.Context, g globalFlags, args []string, stdout, stderr io.Writer) error {
	return errors.New("hemd key: not built yet")
}

// kmsCommand runs `hemd kms …`. Placeholder until the KMS work lands.
func kmsCommand(ctx context.Context, g globalFlags, args []string, stdout, stderr io.Writer) error {
	return errors.New("hemd kms: not built yet")
}
