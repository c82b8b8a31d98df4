// Mirrors the Test* functions of k8s.io/apiserver/pkg/storage/etcd3/store_test.go at v0.34.10.

package conformance

import (
	"context"
	"fmt"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/stretchr/testify/require"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apiserver/pkg/apis/example"
	"k8s.io/apiserver/pkg/features"
	"k8s.io/apiserver/pkg/storage"
	"k8s.io/apiserver/pkg/storage/etcd3"
	storagetesting "k8s.io/apiserver/pkg/storage/testing"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	featuregatetesting "k8s.io/component-base/featuregate/testing"
)

func TestCreate(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestCreate(ctx, t, env.store, checkStorageInvariants(env))
}

func TestCreateWithTTL(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestCreateWithTTL(ctx, t, env.store)
}

func TestCreateWithKeyExist(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestCreateWithKeyExist(ctx, t, env.store)
}

func TestGet(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestGet(ctx, t, env.store)
}

func TestUnconditionalDelete(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestUnconditionalDelete(ctx, t, env.store)
}

func TestConditionalDelete(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestConditionalDelete(ctx, t, env.store)
}

func TestDeleteWithSuggestion(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestDeleteWithSuggestion(ctx, t, env.store)
}

func TestDeleteWithSuggestionAndConflict(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestDeleteWithSuggestionAndConflict(ctx, t, env.store)
}

func TestDeleteWithSuggestionOfDeletedObject(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestDeleteWithSuggestionOfDeletedObject(ctx, t, env.store)
}

func TestValidateDeletionWithSuggestion(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestValidateDeletionWithSuggestion(ctx, t, env.store)
}

func TestValidateDeletionWithOnlySuggestionValid(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestValidateDeletionWithOnlySuggestionValid(ctx, t, env.store)
}

func TestDeleteWithConflict(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestDeleteWithConflict(ctx, t, env.store)
}

func TestPreconditionalDeleteWithSuggestion(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestPreconditionalDeleteWithSuggestion(ctx, t, env.store)
}

func TestPreconditionalDeleteWithSuggestionPass(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestPreconditionalDeleteWithOnlySuggestionPass(ctx, t, env.store)
}

func TestListPaging(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestListPaging(ctx, t, env.store)
}

func TestGetListNonRecursive(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestGetListNonRecursive(ctx, t, increaseRV(env.client.Client), env.store)
}

func TestGetListRecursivePrefix(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestGetListRecursivePrefix(ctx, t, env.store)
}

func TestGuaranteedUpdate(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestGuaranteedUpdate(ctx, t, withPrefixTransformer(env), checkStorageInvariants(env))
}

func TestGuaranteedUpdateWithTTL(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestGuaranteedUpdateWithTTL(ctx, t, env.store)
}

func TestGuaranteedUpdateChecksStoredData(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestGuaranteedUpdateChecksStoredData(ctx, t, withPrefixTransformer(env))
}

func TestGuaranteedUpdateWithConflict(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestGuaranteedUpdateWithConflict(ctx, t, env.store)
}

func TestGuaranteedUpdateWithSuggestionAndConflict(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestGuaranteedUpdateWithSuggestionAndConflict(ctx, t, env.store)
}

func TestTransformationFailure(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestTransformationFailure(ctx, t, withPrefixTransformer(env))
}

func TestList(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestList(ctx, t, env.store, compactStorage(env), false, env.client.Kubernetes.(*storagetesting.KubernetesRecorder))
}

func TestConsistentList(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestConsistentList(ctx, t, env.store, increaseRV(env.client.Client), false, true, false)
}

func TestCompactRevision(t *testing.T) {
	// Test requires store to observe extenal changes to compaction revision, requiring dedicated watch on compact key which is enabled by ListFromCacheSnapshot.
	featuregatetesting.SetFeatureGateDuringTest(t, utilfeature.DefaultFeatureGate, features.ListFromCacheSnapshot, true)
	ctx, env := testSetup(t)
	storagetesting.RunTestCompactRevision(ctx, t, env.store, increaseRV(env.client.Client), compactStorage(env))
}

func TestListContinuation(t *testing.T) {
	ctx, env := testSetup(t)
	validation := checkStorageCallsInvariants(env.prefixTr, env.client.KV.(*storagetesting.KVRecorder))
	storagetesting.RunTestListContinuation(ctx, t, env.store, validation)
}

func TestListPaginationRareObject(t *testing.T) {
	// ListFromCacheSnapshots adds additional Get call to read compact key.
	// TODO: Rewrite call validation to only count calls to pods.
	featuregatetesting.SetFeatureGateDuringTest(t, utilfeature.DefaultFeatureGate, features.ListFromCacheSnapshot, false)
	ctx, env := testSetup(t)
	validation := checkStorageCallsInvariants(env.prefixTr, env.client.KV.(*storagetesting.KVRecorder))
	storagetesting.RunTestListPaginationRareObject(ctx, t, env.store, validation)
}

func TestListContinuationWithFilter(t *testing.T) {
	ctx, env := testSetup(t)
	validation := checkStorageCallsInvariants(env.prefixTr, env.client.KV.(*storagetesting.KVRecorder))
	storagetesting.RunTestListContinuationWithFilter(ctx, t, env.store, validation)
}

func TestNamespaceScopedList(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestNamespaceScopedList(ctx, t, env.store)
}

func TestListInconsistentContinuation(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestListInconsistentContinuation(ctx, t, env.store, compactStorage(env))
}

func TestListResourceVersionMatch(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestListResourceVersionMatch(ctx, t, withPrefixTransformer(env))
}

func TestStats(t *testing.T) {
	for _, sizeBasedListCostEstimate := range []bool{true, false} {
		t.Run(fmt.Sprintf("SizeBasedListCostEstimate=%v", sizeBasedListCostEstimate), func(t *testing.T) {
			featuregatetesting.SetFeatureGateDuringTest(t, utilfeature.DefaultFeatureGate, features.SizeBasedListCostEstimate, sizeBasedListCostEstimate)
			// Match transformer with cacher tests.
			ctx, env := testSetup(t)
			env.store.SetKeysFunc(env.getKeys)
			storagetesting.RunTestStats(ctx, t, env.store, env.codec, env.transformer, sizeBasedListCostEstimate)
		})
	}
}

// =======================================================================
// Implementation-specific tests are following.
// The following tests are exercising the details of the implementation
// not the actual user-facing contract of storage interface.
// As such, they may focus e.g. on non-functional aspects like performance
// impact.
// =======================================================================

func TestPrefix(t *testing.T) {
	t.Skip("checks the unexported store.pathPrefix normalisation only; no etcd behaviour involved")
}

func Test_growSlice(t *testing.T) {
	t.Skip("unit test of the unexported etcd3.growSlice; no etcd behaviour involved")
}

// TestLeaseMaxObjectCount: upstream reads the unexported
// leaseManager.leaseAttachedObjectCount; this port checks the same thing as
// seen in etcd: the first two keys share a lease, the third gets a new one.
func TestLeaseMaxObjectCount(t *testing.T) {
	cfg := etcd3.NewDefaultLeaseManagerConfig() // ReuseDurationSeconds: defaultLeaseReuseDurationSeconds
	cfg.MaxObjectCount = 2
	ctx, env := testSetup(t, withLeaseConfig(cfg))

	obj := &example.Pod{ObjectMeta: metav1.ObjectMeta{Name: "foo"}}
	out := &example.Pod{}

	testCases := []struct {
		key                 string
		expectAttachedCount int64
	}{
		{
			key:                 "testkey1",
			expectAttachedCount: 1,
		},
		{
			key:                 "testkey2",
			expectAttachedCount: 2,
		},
		{
			key: "testkey3",
			// We assume each time has 1 object attached to the lease
			// so after granting a new lease, the recorded count is set to 1
			expectAttachedCount: 1,
		},
	}

	var prevLease int64
	for i, tc := range testCases {
		err := env.store.Create(ctx, tc.key, obj, out, 120)
		if err != nil {
			t.Fatalf("Set failed: %v", err)
		}
		resp, err := env.client.KV.Get(ctx, env.etcdKey(tc.key))
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Kvs) != 1 || resp.Kvs[0].Lease == 0 {
			t.Fatalf("%s: expected one key with a lease, got %v", tc.key, resp.Kvs)
		}
		lease := resp.Kvs[0].Lease
		if i > 0 {
			sameLease := tc.expectAttachedCount > 1
			if (lease == prevLease) != sameLease {
				t.Errorf("%s: lease %x, previous key's lease %x; expected same lease: %v", tc.key, lease, prevLease, sameLease)
			}
		}
		prevLease = lease
	}
}

func TestValidateKey(t *testing.T) {
	t.Skip("unit test of the unexported store.prepareKey; TestInvalidKeys covers it through the public API")
}

func TestInvalidKeys(t *testing.T) {
	const invalidKey = "/foo/bar/../baz"
	expectedError := fmt.Sprintf("invalid key: %q", invalidKey)

	expectInvalidKey := func(methodName string, err error) {
		if err == nil {
			t.Errorf("[%s] expected invalid key error; got nil", methodName)
		} else if err.Error() != expectedError {
			t.Errorf("[%s] expected invalid key error; got %v", methodName, err)
		}
	}

	ctx, env := testSetup(t)
	store := env.store
	expectInvalidKey("Create", store.Create(ctx, invalidKey, nil, nil, 0))
	expectInvalidKey("Delete", store.Delete(ctx, invalidKey, nil, nil, nil, nil, storage.DeleteOptions{}))
	_, watchErr := store.Watch(ctx, invalidKey, storage.ListOptions{})
	expectInvalidKey("Watch", watchErr)
	expectInvalidKey("Get", store.Get(ctx, invalidKey, storage.GetOptions{}, nil))
	expectInvalidKey("GetList", store.GetList(ctx, invalidKey, storage.ListOptions{}, nil))
	expectInvalidKey("GuaranteedUpdate", store.GuaranteedUpdate(ctx, invalidKey, nil, true, nil, nil, nil))
}

func TestGetCurrentResourceVersion(t *testing.T) {
	ctx, env := testSetup(t)
	store := env.store
	versioner := storage.APIObjectVersioner{}

	makePod := func(name string) *example.Pod {
		return &example.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name},
		}
	}
	createPod := func(obj *example.Pod) *example.Pod {
		key := "pods/" + obj.Namespace + "/" + obj.Name
		out := &example.Pod{}
		err := store.Create(context.TODO(), key, obj, out, 0)
		require.NoError(t, err)
		return out
	}
	getPod := func(name, ns string) *example.Pod {
		key := "pods/" + ns + "/" + name
		out := &example.Pod{}
		err := store.Get(context.TODO(), key, storage.GetOptions{}, out)
		require.NoError(t, err)
		return out
	}

	// create a pod and make sure its RV is equal to the one maintained by etcd
	pod := createPod(makePod("pod-1"))
	currentStorageRV, err := store.GetCurrentResourceVersion(context.TODO())
	require.NoError(t, err)
	podRV, err := versioner.ParseResourceVersion(pod.ResourceVersion)
	require.NoError(t, err)
	require.Equal(t, currentStorageRV, podRV, "expected the global etcd RV to be equal to pod's RV")

	// now make unrelated write and make sure the target function returns global etcd RV
	// (upstream writes compact_rev_key here; on a shared endpoint that would
	// poison the compaction bookkeeping of later tests, so write another
	// key outside the store's prefix)
	resp, err := env.client.KV.Put(ctx, env.root+"-unrelated", pod.ResourceVersion)
	require.NoError(t, err)
	currentStorageRV, err = store.GetCurrentResourceVersion(context.TODO())
	require.NoError(t, err)
	require.NoError(t, err)
	require.Equal(t, currentStorageRV, uint64(resp.Header.Revision), "expected the global etcd RV to be equal to replicaset's RV")

	// ensure that the pod's RV hasn't been changed
	currentPod := getPod(pod.Name, pod.Namespace)
	currentPodRV, err := versioner.ParseResourceVersion(currentPod.ResourceVersion)
	require.NoError(t, err)
	require.Equal(t, currentPodRV, podRV, "didn't expect to see the pod's RV changed")
}

// TestPrefixGetKeys: upstream's, with store.getKeys replaced by its copy
// (env.getKeys) and every key moved under this setup's unique root.
func TestPrefixGetKeys(t *testing.T) {
	ctx, env := testSetup(t, withPrefix("/registry"), withResourcePrefix("pods"))
	c := env.client
	r := env.root
	_, err := c.KV.Put(ctx, r+"/key", "a")
	if err != nil {
		t.Fatal(err)
	}

	_, err = c.KV.Put(ctx, r+"/registry/key", "b")
	if err != nil {
		t.Fatal(err)
	}

	_, err = c.KV.Put(ctx, r+"/registry/pods/key", "c")
	if err != nil {
		t.Fatal(err)
	}

	_, err = c.KV.Put(ctx, r+"/registry/podskey", "d")
	if err != nil {
		t.Fatal(err)
	}

	gotKeys, err := env.getKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}

	wantKeys := []string{r + "/registry/pods/key"}
	if diff := cmp.Diff(wantKeys, gotKeys); diff != "" {
		t.Errorf("getKeys diff:\n%s", diff)
	}
}

// TestPrefixStats: upstream's, with store.getKeys replaced by its copy
// (env.getKeys) and every key moved under this setup's unique root.
func TestPrefixStats(t *testing.T) {
	tcs := []struct {
		name        string
		estimate    bool
		setKeys     bool
		expectStats storage.Stats
	}{
		{
			name:        "SizeBasedListCostEstimate=false,SetKeys=false",
			setKeys:     false,
			estimate:    false,
			expectStats: storage.Stats{ObjectCount: 1},
		},
		{
			name:        "SizeBasedListCostEstimate=false,SetKeys=true",
			setKeys:     true,
			estimate:    false,
			expectStats: storage.Stats{ObjectCount: 1},
		},
		{
			name:        "SizeBasedListCostEstimate=true,SetKeys=false",
			setKeys:     false,
			estimate:    true,
			expectStats: storage.Stats{ObjectCount: 1},
		},
		{
			name:        "SizeBasedListCostEstimate=true,SetKeys=true",
			setKeys:     true,
			estimate:    true,
			expectStats: storage.Stats{ObjectCount: 1, EstimatedAverageObjectSizeBytes: 3},
		},
	}
	for _, tc := range tcs {
		t.Run(tc.name, func(t *testing.T) {
			featuregatetesting.SetFeatureGateDuringTest(t, utilfeature.DefaultFeatureGate, features.SizeBasedListCostEstimate, tc.estimate)
			ctx, env := testSetup(t, withPrefix("/registry"), withResourcePrefix("pods"))
			store, c, r := env.store, env.client, env.root
			if tc.setKeys {
				store.SetKeysFunc(env.getKeys)
			}
			_, err := c.KV.Put(ctx, r+"/key", "a")
			if err != nil {
				t.Fatal(err)
			}

			_, err = c.KV.Put(ctx, r+"/registry/key", "ab")
			if err != nil {
				t.Fatal(err)
			}

			_, err = c.KV.Put(ctx, r+"/registry/pods/key", "abc")
			if err != nil {
				t.Fatal(err)
			}

			_, err = c.KV.Put(ctx, r+"/registry/podskey", "abcd")
			if err != nil {
				t.Fatal(err)
			}

			listOut := &example.PodList{}
			// Ignore error as decode is expected to fail
			_ = store.GetList(ctx, "pods", storage.ListOptions{Predicate: storage.Everything, Recursive: true}, listOut)

			gotStats, err := store.Stats(ctx)
			if err != nil {
				t.Fatal(err)
			}

			if diff := cmp.Diff(tc.expectStats, gotStats); diff != "" {
				t.Errorf("Stats diff:\n%s", diff)
			}

		})
	}
}
