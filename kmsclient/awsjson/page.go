package awsjson

import (
	"encoding/base64"
	"fmt"
	"sort"
)

// paginate returns the page of items (sorted by order, ascending) that a
// request's Limit and Marker select, and the marker of the next page ("" at
// the end). A marker is the order key of the last item returned, so a page
// boundary stays put when items before it are added or removed. Limit must
// be in 1..max; it defaults to def.
func paginate[T any](items []T, order func(T) string, in *request, max, def int) ([]T, string, error) {
	limit := def
	if in.Limit != nil {
		limit = *in.Limit
		if limit < 1 || limit > max {
			return nil, "", validation("1 validation error detected: Value '%d' at 'limit' failed to satisfy constraint: Member must have value between 1 and %d", limit, max)
		}
	}
	start := 0
	if in.Marker != "" {
		last, err := base64.RawURLEncoding.DecodeString(in.Marker)
		if err != nil || len(last) == 0 {
			return nil, "", &apiError{Type: "InvalidMarkerException", Message: fmt.Sprintf("marker %q is not one this KMS returned", in.Marker)}
		}
		start = sort.Search(len(items), func(i int) bool { return order(items[i]) > string(last) })
	}
	end := min(start+limit, len(items))
	page := items[start:end]
	if end == len(items) {
		return page, "", nil
	}
	return page, base64.RawURLEncoding.EncodeToString([]byte(order(items[end-1]))), nil
}

// listed is a List operation's response: the page under field (never
// null), Truncated, and NextMarker when there is more.
func listed[T any](field string, page []T, next string) map[string]any {
	if page == nil {
		page = []T{}
	}
	out := map[string]any{field: page, "Truncated": next != ""}
	if next != "" {
		out["NextMarker"] = next
	}
	return out
}
