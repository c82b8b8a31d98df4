/*
Storage conformance suite of kube-apiserver, run against an external etcd
endpoint (a plain etcd, or ste-router over its shards).

The setup mirrors testSetup() of k8s.io/apiserver/pkg/storage/etcd3/store_test.go
at v0.34.10, with these differences, all forced by running outside of package
etcd3 against a long-lived endpoint instead of a fresh embedded etcd:

  - the client is a clientv3/kubernetes client dialled to
    $STE_CONFORMANCE_ENDPOINT (comma separated URLs allowed), wrapped in the
    same KVRecorder/KubernetesRecorder that testserver.RunEtcd installs;
  - every testSetup() call gets its own key prefix
    (/ste-conformance/<run id>/<n>/), because the endpoint keeps the keys of
    earlier tests and runs;
  - the store's value.Transformer is a switchable wrapper around the same
    storagetesting.PrefixTransformer, so that UpdatePrefixTransformer and
    CorruptTransformer can swap it from outside package etcd3 (upstream assigns
    the unexported store.transformer and store.watcher.transformer fields; both
    fields hold our wrapper here, so swapping it is equivalent);
  - store.getKeys (unexported) is replaced by a copy, getKeys below.
*/

package conformance

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/kubernetes"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/grpclog"

	"k8s.io/apimachinery/pkg/api/apitesting"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/apiserver/pkg/apis/example"
	examplev1 "k8s.io/apiserver/pkg/apis/example/v1"
	"k8s.io/apiserver/pkg/features"
	"k8s.io/apiserver/pkg/storage"
	"k8s.io/apiserver/pkg/storage/etcd3"
	storagetesting "k8s.io/apiserver/pkg/storage/testing"
	"k8s.io/apiserver/pkg/storage/value"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	"k8s.io/utils/clock"
)

// EndpointEnv names the environment variable holding the etcd endpoint(s).
const EndpointEnv = "STE_CONFORMANCE_ENDPOINT"

// ProgressNotifyEnv must be set (to anything, e.g. "1s") when the endpoint
// sends watch progress notifications every second, as upstream's
// TestProgressNotify configures its embedded etcd: plain etcd
// --watch-progress-notify-interval=1s, ste-router --progress-interval 1s.
const ProgressNotifyEnv = "STE_CONFORMANCE_PROGRESS_NOTIFY"

var scheme = runtime.NewScheme()
var codecs = serializer.NewCodecFactory(scheme)

const defaultTestPrefix = "test!"

// maxLimit mirrors the unexported etcd3.maxLimit.
const maxLimit = 10000

// runID keeps the keys of one `go test` run apart from earlier runs.
var runID = func() string {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return fmt.Sprintf("%d-%s", time.Now().Unix(), hex.EncodeToString(b))
}()

var setupCounter atomic.Int64

func init() {
	metav1.AddToGroupVersion(scheme, metav1.SchemeGroupVersion)
	utilruntime.Must(example.AddToScheme(scheme))
	utilruntime.Must(examplev1.AddToScheme(scheme))

	grpclog.SetLoggerV2(grpclog.NewLoggerV2(io.Discard, io.Discard, os.Stderr))
}

func newPod() runtime.Object {
	return &example.Pod{}
}

func newPodList() runtime.Object {
	return &example.PodList{}
}

// TestMain fails the whole run at once, with one clear message, when
// $STE_CONFORMANCE_ENDPOINT is unset.
func TestMain(m *testing.M) {
	if strings.TrimSpace(os.Getenv(EndpointEnv)) == "" {
		fmt.Fprintf(os.Stderr, "FAIL: %s is not set: point it at the etcd v3 gRPC endpoint under test, e.g. %s=http://127.0.0.1:2379\n", EndpointEnv, EndpointEnv)
		os.Exit(1)
	}
	os.Exit(m.Run())
}

// endpoints returns the endpoint(s) from $STE_CONFORMANCE_ENDPOINT or fails the test.
func endpoints(t testing.TB) []string {
	t.Helper()
	raw := strings.TrimSpace(os.Getenv(EndpointEnv))
	if raw == "" {
		t.Fatalf("%s is not set: point it at the etcd v3 gRPC endpoint under test, e.g. %s=http://127.0.0.1:2379", EndpointEnv, EndpointEnv)
	}
	var eps []string
	for _, ep := range strings.Split(raw, ",") {
		if ep = strings.TrimSpace(ep); ep != "" {
			eps = append(eps, ep)
		}
	}
	return eps
}

// newClient is testserver.RunEtcd's client half, dialled to the external endpoint.
func newClient(t testing.TB) *kubernetes.Client {
	t.Helper()
	client, err := kubernetes.New(clientv3.Config{
		Endpoints:   endpoints(t),
		DialTimeout: 10 * time.Second,
		DialOptions: []grpc.DialOption{grpc.WithBlock()},
		Logger:      zaptest.NewLogger(t, zaptest.Level(zapcore.ErrorLevel)).Named("etcd-client"),
	})
	if err != nil {
		t.Fatalf("cannot connect to %s=%q: %v", EndpointEnv, os.Getenv(EndpointEnv), err)
	}
	t.Cleanup(func() { _ = client.Close() })
	client.KV = storagetesting.NewKVRecorder(client.KV)
	client.Kubernetes = storagetesting.NewKubernetesRecorder(client.Kubernetes)
	return client
}

// switchTransformer is the transformer given to etcd3.New (so to both the
// store and its watcher); tests swap what it delegates to.
type switchTransformer struct {
	current atomic.Pointer[transformerHolder]
}

type transformerHolder struct{ value.Transformer }

func newSwitchTransformer(t value.Transformer) *switchTransformer {
	s := &switchTransformer{}
	s.set(t)
	return s
}

func (s *switchTransformer) get() value.Transformer  { return s.current.Load().Transformer }
func (s *switchTransformer) set(t value.Transformer) { s.current.Store(&transformerHolder{t}) }

func (s *switchTransformer) TransformFromStorage(ctx context.Context, data []byte, dataCtx value.Context) ([]byte, bool, error) {
	return s.get().TransformFromStorage(ctx, data, dataCtx)
}

func (s *switchTransformer) TransformToStorage(ctx context.Context, data []byte, dataCtx value.Context) ([]byte, error) {
	return s.get().TransformToStorage(ctx, data, dataCtx)
}

// etcdStore is the method set of etcd3's *store that the tests use.
type etcdStore interface {
	storage.Interface
	Close()
}

// testEnv is what upstream's tests reach through *store and *kubernetes.Client.
type testEnv struct {
	store          etcdStore
	client         *kubernetes.Client
	codec          runtime.Codec
	transformer    *switchTransformer
	prefixTr       *storagetesting.PrefixTransformer // upstream's store.transformer
	root           string                            // unique root of this setup, no trailing '/'
	pathPrefix     string                            // store's effective path prefix, ends in '/'
	resourcePrefix string
	groupResource  schema.GroupResource
}

// etcdKey is store.prepareKey for valid keys: the etcd key of a storage key.
func (e *testEnv) etcdKey(key string) string {
	return e.pathPrefix + strings.TrimPrefix(key, "/")
}

// getKeys is a copy of the unexported (*store).getKeys.
func (e *testEnv) getKeys(ctx context.Context) ([]string, error) {
	prefix := e.etcdKey(e.resourcePrefix)
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	resp, err := e.client.KV.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, err
	}
	keys := make([]string, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		keys = append(keys, string(kv.Key))
	}
	return keys, nil
}

func newTestLeaseManagerConfig() etcd3.LeaseManagerConfig {
	cfg := etcd3.NewDefaultLeaseManagerConfig()
	// As 30s is the default timeout for testing in global configuration,
	// we cannot wait longer than that in a single time: change it to 1s
	// for testing purposes. See wait.ForeverTestTimeout
	cfg.ReuseDurationSeconds = 1
	return cfg
}

type setupOptions struct {
	codec          runtime.Codec
	newFunc        func() runtime.Object
	newListFunc    func() runtime.Object
	prefix         string // relative to the setup's unique root
	resourcePrefix string
	groupResource  schema.GroupResource
	leaseConfig    etcd3.LeaseManagerConfig
}

type setupOption func(*setupOptions)

// withPrefix puts the store's prefix under this setup's unique root.
func withPrefix(prefix string) setupOption {
	return func(options *setupOptions) {
		options.prefix = prefix
	}
}

func withResourcePrefix(prefix string) setupOption {
	return func(options *setupOptions) {
		options.resourcePrefix = prefix
	}
}

func withLeaseConfig(leaseConfig etcd3.LeaseManagerConfig) setupOption {
	return func(options *setupOptions) {
		options.leaseConfig = leaseConfig
	}
}

func withDefaults(options *setupOptions) {
	options.codec = apitesting.TestCodec(codecs, examplev1.SchemeGroupVersion)
	options.newFunc = newPod
	options.newListFunc = newPodList
	options.prefix = ""
	options.resourcePrefix = "/pods"
	options.groupResource = schema.GroupResource{Resource: "pods"}
	options.leaseConfig = newTestLeaseManagerConfig()
}

func testSetup(t testing.TB, opts ...setupOption) (context.Context, *testEnv) {
	t.Helper()
	setupOpts := setupOptions{}
	opts = append([]setupOption{withDefaults}, opts...)
	for _, opt := range opts {
		opt(&setupOpts)
	}
	client := newClient(t)

	root := fmt.Sprintf("/ste-conformance/%s/%d", runID, setupCounter.Add(1))
	prefix := root + "/" + strings.TrimPrefix(setupOpts.prefix, "/")
	pathPrefix := path.Join("/", prefix)
	if !strings.HasSuffix(pathPrefix, "/") {
		pathPrefix += "/"
	}
	t.Logf("store prefix %s", pathPrefix)

	prefixTr := storagetesting.NewPrefixTransformer([]byte(defaultTestPrefix), false)
	transformer := newSwitchTransformer(prefixTr)

	versioner := storage.APIObjectVersioner{}
	compactor := etcd3.NewCompactor(client.Client, 0, clock.RealClock{}, nil)
	t.Cleanup(compactor.Stop)
	store := etcd3.New(
		client,
		compactor,
		setupOpts.codec,
		setupOpts.newFunc,
		setupOpts.newListFunc,
		prefix,
		setupOpts.resourcePrefix,
		setupOpts.groupResource,
		transformer,
		setupOpts.leaseConfig,
		etcd3.NewDefaultDecoder(setupOpts.codec, versioner),
		versioner,
	)
	t.Cleanup(store.Close)
	return context.Background(), &testEnv{
		store:          store,
		client:         client,
		codec:          setupOpts.codec,
		transformer:    transformer,
		prefixTr:       prefixTr,
		root:           root,
		pathPrefix:     pathPrefix,
		resourcePrefix: setupOpts.resourcePrefix,
		groupResource:  setupOpts.groupResource,
	}
}

// ===================================================
// Helpers of upstream's store_test.go / watcher_test.go
// ===================================================

func checkStorageInvariants(env *testEnv) storagetesting.KeyValidation {
	return func(ctx context.Context, t *testing.T, key string) {
		getResp, err := env.client.KV.Get(ctx, env.etcdKey(key))
		if err != nil {
			t.Fatalf("etcdClient.KV.Get failed: %v", err)
		}
		if len(getResp.Kvs) == 0 {
			t.Fatalf("expecting non empty result on key: %s", key)
		}
		decoded, err := runtime.Decode(env.codec, getResp.Kvs[0].Value[len(defaultTestPrefix):])
		if err != nil {
			t.Fatalf("expecting successful decode of object from %v\n%v", err, string(getResp.Kvs[0].Value))
		}
		obj := decoded.(*example.Pod)
		if obj.ResourceVersion != "" {
			t.Errorf("stored object should have empty resource version")
		}
		if obj.SelfLink != "" {
			t.Errorf("stored output should have empty selfLink")
		}
	}
}

type storeWithPrefixTransformer struct {
	etcdStore
	env *testEnv
}

func withPrefixTransformer(env *testEnv) *storeWithPrefixTransformer {
	return &storeWithPrefixTransformer{etcdStore: env.store, env: env}
}

func (s *storeWithPrefixTransformer) UpdatePrefixTransformer(modifier storagetesting.PrefixTransformerModifier) func() {
	originalTransformer := s.env.transformer.get().(*storagetesting.PrefixTransformer)
	transformer := *originalTransformer
	s.env.transformer.set(modifier(&transformer))
	return func() {
		s.env.transformer.set(originalTransformer)
	}
}

// failingTransformer fails every read with "bits flipped"; wrapped by
// etcd3.WithCorruptObjErrorHandlingTransformer it returns exactly upstream's
// &corruptObjectError{err: fmt.Errorf("bits flipped"), errType: untransformable}.
type failingTransformer struct {
	value.Transformer
}

func (f *failingTransformer) TransformFromStorage(ctx context.Context, data []byte, dataCtx value.Context) (out []byte, stale bool, err error) {
	return nil, true, fmt.Errorf("bits flipped")
}

type storeWithCorruptedTransformer struct {
	etcdStore
	env *testEnv
}

func (s *storeWithCorruptedTransformer) CorruptTransformer() func() {
	original := s.env.transformer.get()
	ct := etcd3.WithCorruptObjErrorHandlingTransformer(&failingTransformer{Transformer: original})
	s.env.transformer.set(ct)
	return func() {
		s.env.transformer.set(original)
	}
}

func checkStorageCallsInvariants(transformer *storagetesting.PrefixTransformer, recorder *storagetesting.KVRecorder) storagetesting.CallsValidation {
	return func(t *testing.T, pageSize, estimatedProcessedObjects uint64) {
		if reads := transformer.GetReadsAndReset(); reads != estimatedProcessedObjects {
			t.Errorf("unexpected reads: %d, expected: %d", reads, estimatedProcessedObjects)
		}
		estimatedGetCalls := uint64(1)
		if pageSize != 0 {
			// We expect that kube-apiserver will be increasing page sizes
			// if not full pages are received, so we should see significantly less
			// than 1000 pages (which would be result of talking to etcd with page size
			// copied from pred.Limit).
			// The expected number of calls is n+1 where n is the smallest n so that:
			// pageSize + pageSize * 2 + pageSize * 4 + ... + pageSize * 2^n >= podCount.
			// For pageSize = 1, podCount = 1000, we get n+1 = 10, 2 ^ 10 = 1024.
			currLimit := pageSize
			for sum := uint64(1); sum < estimatedProcessedObjects; {
				currLimit *= 2
				if currLimit > maxLimit {
					currLimit = maxLimit
				}
				sum += currLimit
				estimatedGetCalls++
			}
		}
		if reads := recorder.GetReadsAndReset(); reads != estimatedGetCalls {
			t.Fatalf("unexpected reads: %d, want: %d", reads, estimatedGetCalls)
		}
	}
}

// compactStorage is upstream's, with etcd3.Compact on the same endpoint.
//
// One difference: upstream starts etcd3.Compact's compare-and-swap on the
// version of compact_rev_key from 0, which only compacts on a fresh etcd (a
// failed CAS is not an error, so its retry-on-error never fires). On the
// shared endpoint the key already exists, so the CAS starts from its current
// version, read without going through the KVRecorder.
func compactStorage(env *testEnv) storagetesting.Compaction {
	client := env.client.Client
	rawKV := clientv3.NewKV(client)
	return func(ctx context.Context, t *testing.T, resourceVersion string) {
		versioner := storage.APIObjectVersioner{}
		rv, err := versioner.ParseResourceVersion(resourceVersion)
		if err != nil {
			t.Fatal(err)
		}
		var currentVersion int64
		resp, err := rawKV.Get(ctx, compactRevKey)
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Kvs) > 0 {
			currentVersion = resp.Kvs[0].Version
		}
		var compactRev int64
		currentVersion, _, compactRev, err = etcd3.Compact(ctx, client, currentVersion, int64(rv))
		if err != nil {
			_, _, compactRev, err = etcd3.Compact(ctx, client, currentVersion, int64(rv))
		}
		if err != nil {
			t.Fatal(err)
		}
		if compactRev != int64(rv) {
			t.Fatalf("compaction to %d not done: %s holds %d", rv, compactRevKey, compactRev)
		}
		// Wait for compaction to be observed.
		if utilfeature.DefaultFeatureGate.Enabled(features.ListFromCacheSnapshot) {
			deadline := time.After(wait.ForeverTestTimeout)
			for {
				select {
				case <-ctx.Done():
					t.Fatal(ctx.Err())
				case <-deadline:
					t.Fatalf("store.CompactRevision()=%d, still not %d after %v", env.store.CompactRevision(), rv, wait.ForeverTestTimeout)
				case <-time.After(100 * time.Millisecond):
				}
				compactedRev := env.store.CompactRevision()
				if compactedRev == int64(rv) {
					break
				}
			}
		}
	}
}

// compactRevKey mirrors the unexported etcd3.compactRevKey.
const compactRevKey = "compact_rev_key"

func increaseRV(client *clientv3.Client) storagetesting.IncreaseRVFunc {
	return func(ctx context.Context, t *testing.T) {
		if _, err := client.KV.Put(ctx, "increaseRV", "ok"); err != nil {
			t.Fatalf("Could not update increaseRV: %v", err)
		}
	}
}
