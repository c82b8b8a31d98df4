// Mirrors the Test* functions of k8s.io/apiserver/pkg/storage/etcd3/watcher_test.go at v0.34.10.

package conformance

import (
	"context"
	"errors"
	"fmt"
	"os"
	"testing"

	"github.com/google/go-cmp/cmp"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/apiserver/pkg/features"
	"k8s.io/apiserver/pkg/storage"
	storagetesting "k8s.io/apiserver/pkg/storage/testing"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	featuregatetesting "k8s.io/component-base/featuregate/testing"
	"k8s.io/utils/ptr"
)

func TestWatch(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestWatch(ctx, t, env.store)
}

func TestClusterScopedWatch(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestClusterScopedWatch(ctx, t, env.store)
}

func TestNamespaceScopedWatch(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestNamespaceScopedWatch(ctx, t, env.store)
}

func TestDeleteTriggerWatch(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestDeleteTriggerWatch(ctx, t, env.store)
}

func TestWatchFromZero(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestWatchFromZero(ctx, t, env.store, compactStorage(env))
}

// TestWatchFromNonZero tests that
// - watch from non-0 should just watch changes after given version
func TestWatchFromNoneZero(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestWatchFromNonZero(ctx, t, env.store)
}

func TestDelayedWatchDelivery(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestDelayedWatchDelivery(ctx, t, env.store)
}

func TestWatchError(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestWatchError(ctx, t, withPrefixTransformer(env))
}

func TestWatchContextCancel(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestWatchContextCancel(ctx, t, env.store)
}

func TestWatcherTimeout(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestWatcherTimeout(ctx, t, env.store)
}

func TestWatchDeleteEventObjectHaveLatestRV(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestWatchDeleteEventObjectHaveLatestRV(ctx, t, env.store)
}

func TestWatchInitializationSignal(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunTestWatchInitializationSignal(ctx, t, env.store)
}

// requireProgressNotify skips unless the endpoint was started with a 1s
// progress-notify interval, as upstream configures its embedded etcd
// (clusterConfig.WatchProgressNotifyInterval = time.Second).
func requireProgressNotify(t *testing.T) {
	if os.Getenv(ProgressNotifyEnv) == "" {
		t.Skipf("needs the endpoint to send progress notifications every 1s (etcd --watch-progress-notify-interval=1s, ste-router --progress-interval 1s) and %s set", ProgressNotifyEnv)
	}
}

func TestProgressNotify(t *testing.T) {
	requireProgressNotify(t)
	ctx, env := testSetup(t)
	storagetesting.RunOptionalTestProgressNotify(ctx, t, env.store, increaseRV(env.client.Client))
}

func TestWatchWithUnsafeDelete(t *testing.T) {
	featuregatetesting.SetFeatureGateDuringTest(t, utilfeature.DefaultFeatureGate, features.AllowUnsafeMalformedObjectDeletion, true)
	ctx, env := testSetup(t)
	storagetesting.RunTestWatchWithUnsafeDelete(ctx, t, &storeWithCorruptedTransformer{etcdStore: env.store, env: env})
}

// TestWatchDispatchBookmarkEvents makes sure that
// setting allowWatchBookmarks query param against
// etcd implementation doesn't have any effect.
func TestWatchDispatchBookmarkEvents(t *testing.T) {
	requireProgressNotify(t)
	ctx, env := testSetup(t)
	storagetesting.RunTestWatchDispatchBookmarkEvents(ctx, t, env.store, false)
}

func TestSendInitialEventsBackwardCompatibility(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunSendInitialEventsBackwardCompatibility(ctx, t, env.store)
}

func TestEtcdWatchSemantics(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunWatchSemantics(ctx, t, withRVOneAsBaseline(ctx, t, env))
}

func TestEtcdWatchSemanticsWithConcurrentDecode(t *testing.T) {
	featuregatetesting.SetFeatureGateDuringTest(t, utilfeature.DefaultFeatureGate, features.ConcurrentWatchObjectDecode, true)
	ctx, env := testSetup(t)
	storagetesting.RunWatchSemantics(ctx, t, withRVOneAsBaseline(ctx, t, env))
}

// rvOneAsBaselineStore: RunWatchSemantics' "RV=1" scenarios watch from
// revision 1, meaning "from the start of this (fresh, never compacted)
// etcd". The shared endpoint has been compacted by earlier tests and runs, so
// such a watch would get "too old resource version". This wrapper maps a
// watch from RV "1" to the endpoint's revision when the test started, before
// it created anything under its prefix: the same history as seen by the test.
type rvOneAsBaselineStore struct {
	etcdStore
	baseline string
}

func withRVOneAsBaseline(ctx context.Context, t *testing.T, env *testEnv) *rvOneAsBaselineStore {
	rv, err := env.store.GetCurrentResourceVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return &rvOneAsBaselineStore{etcdStore: env.store, baseline: fmt.Sprintf("%d", rv)}
}

func (s *rvOneAsBaselineStore) Watch(ctx context.Context, key string, opts storage.ListOptions) (watch.Interface, error) {
	if opts.ResourceVersion == "1" {
		opts.ResourceVersion = s.baseline
	}
	return s.etcdStore.Watch(ctx, key, opts)
}

func TestEtcdWatchSemanticInitialEventsExtended(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunWatchSemanticInitialEventsExtended(ctx, t, env.store)
}

func TestWatchListMatchSingle(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunWatchListMatchSingle(ctx, t, env.store)
}

func TestWatchErrorEventIsBlockingFurtherEvent(t *testing.T) {
	ctx, env := testSetup(t)
	storagetesting.RunWatchErrorIsBlockingFurtherEvents(ctx, t, withPrefixTransformer(env))
}

// =======================================================================
// Implementation-specific tests are following.
// The following tests are exercising the details of the implementation
// not the actual user-facing contract of storage interface.
// As such, they may focus e.g. on non-functional aspects like performance
// impact.
// =======================================================================

// TestWatchErrorIncorrectConfiguration checks if an error
// will be returned when the storage hasn't been properly
// initialised for watch requests
// (upstream calls the unexported store.watcher.Watch; store.Watch forwards to it).
func TestWatchErrorIncorrectConfiguration(t *testing.T) {
	scenarios := []struct {
		name            string
		setupFn         func(opts *setupOptions)
		requestOpts     storage.ListOptions
		enableWatchList bool
		expectedErr     error
	}{
		{
			name:        "no newFunc provided",
			setupFn:     func(opts *setupOptions) { opts.newFunc = nil },
			requestOpts: storage.ListOptions{ProgressNotify: true},
			expectedErr: apierrors.NewInternalError(errors.New("progressNotify for watch is unsupported by the etcd storage because no newFunc was provided")),
		},
	}
	for _, scenario := range scenarios {
		t.Run(scenario.name, func(t *testing.T) {
			if scenario.enableWatchList {
				featuregatetesting.SetFeatureGateDuringTest(t, utilfeature.DefaultFeatureGate, features.WatchList, true)
			}
			origCtx, env := testSetup(t, scenario.setupFn)
			ctx, cancel := context.WithCancel(origCtx)
			defer cancel()

			w, err := env.store.Watch(ctx, "/abc", scenario.requestOpts)
			if err == nil {
				t.Fatalf("expected an error but got none")
			}
			if w != nil {
				t.Fatalf("didn't expect a watcher because the test assumes incorrect store initialisation")
			}
			if err.Error() != scenario.expectedErr.Error() {
				t.Fatalf("unexpected err = %v, expected = %v", err, scenario.expectedErr)
			}
		})
	}
}

// TestTooLargeResourceVersionErrorForWatchList: upstream watches from RV 102
// on a fresh etcd whose revision is 1; on the shared endpoint the watch
// starts 100 revisions past the current one instead. Upstream calls the
// unexported store.watcher.Watch; store.Watch forwards to it.
func TestTooLargeResourceVersionErrorForWatchList(t *testing.T) {
	featuregatetesting.SetFeatureGateDuringTest(t, utilfeature.DefaultFeatureGate, features.WatchList, true)
	origCtx, env := testSetup(t)
	ctx, cancel := context.WithCancel(origCtx)
	defer cancel()
	requestOpts := storage.ListOptions{
		SendInitialEvents: ptr.To(true),
		Recursive:         true,
		Predicate: storage.SelectionPredicate{
			Field:               fields.Everything(),
			Label:               labels.Everything(),
			AllowWatchBookmarks: true,
		},
	}
	currentRV, err := env.store.GetCurrentResourceVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	tooLargeRV := currentRV + 101
	var expectedErr *apierrors.StatusError
	if !errors.As(storage.NewTooLargeResourceVersionError(tooLargeRV, currentRV, 0), &expectedErr) {
		t.Fatalf("Unable to convert NewTooLargeResourceVersionError to apierrors.StatusError")
	}

	requestOpts.ResourceVersion = fmt.Sprintf("%d", tooLargeRV)
	w, err := env.store.Watch(ctx, "/abc", requestOpts)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()

	actualEvent := <-w.ResultChan()
	if actualEvent.Type != watch.Error {
		t.Fatalf("Unexpected type of the event: %v, expected: %v", actualEvent.Type, watch.Error)
	}
	actualErr, ok := actualEvent.Object.(*metav1.Status)
	if !ok {
		t.Fatalf("Expected *apierrors.StatusError, got: %#v", actualEvent.Object)
	}

	if actualErr.Details.RetryAfterSeconds <= 0 {
		t.Fatalf("RetryAfterSeconds must be > 0, actual value: %v", actualErr.Details.RetryAfterSeconds)
	}
	// rewrite the Details as it contains retry seconds
	// and validate the whole struct
	expectedErr.ErrStatus.Details = actualErr.Details
	if diff := cmp.Diff(*actualErr, expectedErr.ErrStatus); diff != "" {
		t.Fatalf("Unexpected error returned, diff: %v", diff)
	}
}

func TestWatchChanSync(t *testing.T) {
	t.Skip("drives the unexported watchChan.sync with a patched defaultWatcherMaxLimit; not reachable from outside package etcd3")
}
