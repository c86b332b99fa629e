package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/hemd/hemd/kmsclient/hsm"
)

const keysUsage = `usage: hemd key COMMAND [--json] ...
  create [--alias alias/NAME] [--description TEXT]   create a CMK in the HSM
  list                                               list keys
  describe KEY                                       show a key (id, ARN or alias)
  enable KEY | disable KEY                           enable or disable a key
  rotate KEY                                         add a backing-key version
  schedule-deletion KEY [--days 7..30]               schedule deletion (the key stops working)
  cancel-deletion KEY                                cancel it (the key comes back Disabled)
  alias alias/NAME KEY                               name a key`

// keysCommand runs `hemd key ...` against the embedded (or configured) HSM.
func keysCommand(ctx context.Context, g globalFlags, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprintln(stderr, keysUsage)
		return errors.New("key: no command")
	}
	sub, args := args[0], args[1:]
	fs := flag.NewFlagSet("key "+sub, flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print the result as the AWS API does (JSON)")
	alias := fs.String("alias", "", "alias for the new key (create)")
	desc := fs.String("description", "", "description (create)")
	days := fs.Int("days", 30, "pending window in days (schedule-deletion)")
	want := map[string]int{"create": 0, "list": 0, "describe": 1, "enable": 1, "disable": 1, "rotate": 1,
		"schedule-deletion": 1, "cancel-deletion": 1, "alias": 2}
	n, ok := want[sub]
	if !ok {
		fmt.Fprintln(stderr, keysUsage)
		return fmt.Errorf("key: unknown command %q", sub)
	}
	if err := parse(fs, args, n, fmt.Sprintf("%d argument(s)\n%s", n, keysUsage)); err != nil {
		return err
	}
	k, err := openHSM(g)
	if err != nil {
		return err
	}
	defer k.Close()
	out := func(v any) error {
		if *asJSON {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(v)
		}
		switch x := v.(type) {
		case map[string]any:
			if m, ok := x["KeyMetadata"].(hsm.KeyMetadata); ok {
				printKeys(stdout, []hsm.KeyMetadata{m})
			}
		case []hsm.KeyMetadata:
			printKeys(stdout, x)
		}
		return nil
	}
	arg := fs.Arg(0)
	switch sub {
	case "create":
		m, err := k.CreateKey(ctx, *desc)
		if err != nil {
			return err
		}
		if *alias != "" {
			if err := k.CreateAlias(ctx, *alias, m.KeyID); err != nil {
				return err
			}
			m, _ = k.DescribeKey(ctx, m.KeyID)
		}
		return out(map[string]any{"KeyMetadata": m})
	case "list":
		return out(k.ListKeys(ctx))
	case "describe":
		m, err := k.DescribeKey(ctx, arg)
		if err != nil {
			return err
		}
		return out(map[string]any{"KeyMetadata": m})
	case "enable":
		err = k.EnableKey(ctx, arg)
	case "disable":
		err = k.DisableKey(ctx, arg)
	case "rotate":
		err = k.RotateKey(ctx, arg)
	case "schedule-deletion":
		err = k.ScheduleKeyDeletion(ctx, arg, *days)
	case "cancel-deletion":
		err = k.CancelKeyDeletion(ctx, arg)
	case "alias":
		err = k.CreateAlias(ctx, fs.Arg(0), fs.Arg(1))
		arg = fs.Arg(1)
	}
	if err != nil {
		return err
	}
	m, err := k.DescribeKey(ctx, arg)
	if err != nil {
		return err
	}
	return out(map[string]any{"KeyMetadata": m})
}

func printKeys(w io.Writer, ms []hsm.KeyMetadata) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY ID\tSTATE\tVERSIONS\tALIASES\tCREATED")
	for _, m := range ms {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%v\t%s\n", m.KeyID, m.KeyState, m.Versions, m.Aliases, m.CreationDate.Format("2006-01-02 15:04:05"))
	}
	tw.Flush()
}
