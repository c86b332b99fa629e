package awsjson

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/hemd/hemd/kmsclient/hsm"
)

// percentiles reports the median and p99 of per-operation times.
func percentiles(b *testing.B, d []time.Duration) {
	slices.Sort(d)
	if len(d) == 0 {
		return
	}
	b.ReportMetric(float64(d[len(d)/2].Microseconds()), "p50-us")
	b.ReportMetric(float64(d[min(len(d)-1, len(d)*99/100)].Microseconds()), "p99-us")
}

type kmsAPI interface {
	GenerateDataKeyWithoutPlaintext(ctx context.Context, keyID string, ectx map[string]string) ([]byte, string, error)
	Decrypt(ctx context.Context, blob []byte, ectx map[string]string, dst []byte) (string, error)
}

// BenchmarkKMS measures GenerateDataKeyWithoutPlaintext and Decrypt through
// the embedded SoftHSM2 KMS and through hemd kms serve (HTTP + SigV4 on
// loopback), with median and p99 per operation.
func BenchmarkKMS(b *testing.B) {
	srv, k := serve(b)
	ctx := context.Background()
	m, err := k.CreateKey(ctx, "bench")
	if err != nil {
		b.Fatal(err)
	}
	for _, via := range []struct {
		name string
		api  kmsAPI
	}{{"embedded", k}, {"served", NewClient(srv.URL, "local", "AKIDHEMDTEST", "s3cr3t")}} {
		b.Run(via.name+"/GenerateDataKeyWithoutPlaintext", func(b *testing.B) {
			d := make([]time.Duration, 0, b.N)
			for b.Loop() {
				t := time.Now()
				if _, _, err := via.api.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, vol); err != nil {
					b.Fatal(err)
				}
				d = append(d, time.Since(t))
			}
			percentiles(b, d)
		})
		b.Run(via.name+"/Decrypt", func(b *testing.B) {
			blob, _, _ := via.api.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, vol)
			dst := make([]byte, hsm.DataKeySize)
			d := make([]time.Duration, 0, b.N)
			for b.Loop() {
				t := time.Now()
				if _, err := via.api.Decrypt(ctx, blob, vol, dst); err != nil {
					b.Fatal(err)
				}
				d = append(d, time.Since(t))
			}
			percentiles(b, d)
		})
	}
}
