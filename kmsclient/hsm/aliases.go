package hsm

import (
	"context"
	"sort"
	"strings"
)

// Alias is one entry of ListAliases, as AWS names its fields.
type Alias struct {
	AliasName   string `json:"AliasName"`
	AliasArn    string `json:"AliasArn"`
	TargetKeyID string `json:"TargetKeyId"`
}

// ListAliases lists aliases sorted by name; with key (an id, ARN or alias)
// only that key's.
func (k *KMS) ListAliases(ctx context.Context, key string) ([]Alias, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.refresh()
	want := ""
	if key != "" {
		m, err := k.resolve(key)
		if err != nil {
			return nil, err
		}
		want = m.KeyID
	}
	var out []Alias
	for name, id := range k.aliases {
		if want != "" && id != want {
			continue
		}
		arn := strings.Replace(k.arn(id), ":key/"+id, ":"+name, 1)
		out = append(out, Alias{AliasName: name, AliasArn: arn, TargetKeyID: id})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].AliasName < out[j].AliasName })
	return out, nil
}
