package hsm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"unicode/utf8"

	"github.com/miekg/pkcs11"
)

// The administrative operations of AWS KMS that hemd kms serve offers
// besides those volumes need: alias changes, descriptions, tags and random
// bytes. Each writes an audit record.

// UpdateAlias points an existing alias at another key, as AWS's UpdateAlias.
func (k *KMS) UpdateAlias(ctx context.Context, alias, ref string) error {
	k.mu.Lock()
	arn, err := k.retarget(alias, ref)
	k.mu.Unlock()
	k.record(ctx, "UpdateAlias", arn, nil, err)
	return err
}

// retarget is UpdateAlias with k.mu held; it returns the new target's ARN.
func (k *KMS) retarget(alias, ref string) (string, error) {
	if strings.HasPrefix(alias, "alias/aws/") {
		return "", kmsErr(ErrValidation, "alias %s is reserved", alias)
	}
	m, err := k.resolve(ref)
	if err != nil {
		return "", err
	}
	if strings.HasPrefix(ref, "alias/") || strings.Contains(ref, ":alias/") {
		return m.Arn, kmsErr(ErrValidation, "TargetKeyId must be a key id or key ARN, not an alias")
	}
	if m.KeyState == PendingDeletion {
		return m.Arn, kmsErr(ErrInvalidState, "%s is pending deletion", m.Arn)
	}
	if _, ok := k.aliases[alias]; !ok {
		return m.Arn, kmsErr(ErrNotFound, "alias %s is not found", alias)
	}
	k.aliases[alias] = m.KeyID
	return m.Arn, k.saveMeta()
}

// DeleteAlias deletes an alias; its key is not affected.
func (k *KMS) DeleteAlias(ctx context.Context, alias string) error {
	k.mu.Lock()
	var arn string
	err := k.refresh()
	if err == nil {
		id, ok := k.aliases[alias]
		switch {
		case strings.HasPrefix(alias, "alias/aws/"):
			err = kmsErr(ErrValidation, "alias %s is reserved", alias)
		case !ok:
			err = kmsErr(ErrNotFound, "alias %s is not found", alias)
		default:
			arn = k.arn(id)
			delete(k.aliases, alias)
			err = k.saveMeta()
		}
	}
	k.mu.Unlock()
	k.record(ctx, "DeleteAlias", arn, nil, err)
	return err
}

// UpdateKeyDescription replaces a key's description.
func (k *KMS) UpdateKeyDescription(ctx context.Context, ref, description string) error {
	k.mu.Lock()
	m, err := k.resolve(ref)
	if err == nil && utf8.RuneCountInString(description) > 8192 {
		err = kmsErr(ErrValidation, "Description is longer than 8192 characters")
	}
	if err == nil && m.KeyState == PendingDeletion {
		err = kmsErr(ErrInvalidState, "%s is pending deletion", m.Arn)
	}
	if err == nil {
		m.Description = description
		err = k.saveMeta()
	}
	k.mu.Unlock()
	k.record(ctx, "UpdateKeyDescription", arnOf(m), nil, err)
	return err
}

// GenerateRandom returns n (1 to 1024) random bytes from the HSM.
func (k *KMS) GenerateRandom(ctx context.Context, n int) ([]byte, error) {
	var out []byte
	err := kmsErr(ErrValidation, "NumberOfBytes %d is not in 1..1024", n)
	if n >= 1 && n <= 1024 {
		err = internal(k.withSession(ctx, func(sh pkcs11.SessionHandle) error {
			var err error
			out, err = k.p.GenerateRandom(sh, n)
			return err
		}))
	}
	k.record(ctx, "GenerateRandom", "", nil, err)
	return out, err
}

// Tag is a key's tag, as AWS KMS names its fields.
type Tag struct {
	TagKey   string `json:"TagKey"`
	TagValue string `json:"TagValue"`
}

// MaxTags is how many tags a key may have (AWS's quota).
const MaxTags = 50

// ErrTag is AWS KMS's error for a tag that is not valid.
var ErrTag = &Error{Type: "TagException"}

// ValidateTags checks tags as AWS KMS does: keys of 1 to 128 characters,
// values of up to 256, none in the reserved aws: prefix, no key twice.
func ValidateTags(tags []Tag) error {
	seen := map[string]bool{}
	for _, t := range tags {
		switch n := utf8.RuneCountInString(t.TagKey); {
		case n < 1 || n > 128:
			return kmsErr(ErrTag, "tag key %q is not 1 to 128 characters", t.TagKey)
		case utf8.RuneCountInString(t.TagValue) > 256:
			return kmsErr(ErrTag, "the value of tag %q is longer than 256 characters", t.TagKey)
		case strings.HasPrefix(strings.ToLower(t.TagKey), "aws:"):
			return kmsErr(ErrTag, "tag key %q: the aws: prefix is reserved", t.TagKey)
		case seen[t.TagKey]:
			return kmsErr(ErrTag, "tag key %q is given twice", t.TagKey)
		}
		seen[t.TagKey] = true
	}
	return nil
}

// Tags are kept in tags.json beside keys.json (key id → tag key → value),
// read and written under k.mu: only the tag operations use them.
func (k *KMS) loadTags() (map[string]map[string]string, error) {
	all := map[string]map[string]string{}
	b, err := os.ReadFile(filepath.Join(k.stateDir, "tags.json"))
	if errors.Is(err, os.ErrNotExist) {
		return all, nil
	}
	if err == nil {
		err = json.Unmarshal(b, &all)
	}
	if err != nil {
		return nil, kmsErr(ErrInternal, "tags.json: %v", err)
	}
	return all, nil
}

func (k *KMS) saveTags(all map[string]map[string]string) error {
	for id, tags := range all {
		if _, ok := k.meta[id]; !ok || len(tags) == 0 {
			delete(all, id) // deleted keys lose their tags
		}
	}
	b, err := json.MarshalIndent(all, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(k.stateDir, "tags.json.tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err = f.Write(b); err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(k.stateDir, "tags.json"))
	}
	if err != nil {
		return kmsErr(ErrInternal, "tags.json: %v", err)
	}
	return nil
}

// TagResource adds tags to a key or replaces the values of its existing tag
// keys. A key pending deletion cannot be tagged.
func (k *KMS) TagResource(ctx context.Context, ref string, tags []Tag) error {
	k.mu.Lock()
	m, err := k.resolve(ref)
	if err == nil {
		err = ValidateTags(tags)
	}
	if err == nil && m.KeyState == PendingDeletion {
		err = kmsErr(ErrInvalidState, "%s is pending deletion", m.Arn)
	}
	var all map[string]map[string]string
	if err == nil {
		all, err = k.loadTags()
	}
	if err == nil {
		cur := all[m.KeyID]
		if cur == nil {
			cur = map[string]string{}
		}
		for _, t := range tags {
			cur[t.TagKey] = t.TagValue
		}
		if len(cur) > MaxTags {
			err = &Error{Type: "LimitExceededException", Message: fmt.Sprintf("a key may have at most %d tags", MaxTags)}
		} else {
			all[m.KeyID] = cur
			err = k.saveTags(all)
		}
	}
	k.mu.Unlock()
	k.record(ctx, "TagResource", arnOf(m), nil, err)
	return err
}

// UntagResource removes tags by key; keys the key does not have are
// ignored, as on AWS.
func (k *KMS) UntagResource(ctx context.Context, ref string, keys []string) error {
	k.mu.Lock()
	m, err := k.resolve(ref)
	if err == nil && m.KeyState == PendingDeletion {
		err = kmsErr(ErrInvalidState, "%s is pending deletion", m.Arn)
	}
	var all map[string]map[string]string
	if err == nil {
		all, err = k.loadTags()
	}
	if err == nil {
		for _, t := range keys {
			delete(all[m.KeyID], t)
		}
		err = k.saveTags(all)
	}
	k.mu.Unlock()
	k.record(ctx, "UntagResource", arnOf(m), nil, err)
	return err
}

// ListResourceTags returns a key's tags sorted by tag key.
func (k *KMS) ListResourceTags(ctx context.Context, ref string) ([]Tag, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	m, err := k.resolve(ref)
	if err != nil {
		return nil, err
	}
	all, err := k.loadTags()
	if err != nil {
		return nil, err
	}
	out := []Tag{}
	for key, v := range all[m.KeyID] {
		out = append(out, Tag{TagKey: key, TagValue: v})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].TagKey < out[j].TagKey })
	return out, nil
}
