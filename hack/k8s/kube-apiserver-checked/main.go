// Command kube-apiserver-checked is upstream's kube-apiserver (the
// k8s.io/kubernetes release pinned in ../go.mod) with one difference: the
// period of its watch-cache consistency checker,
// k8s.io/apiserver/pkg/storage/cacher.ConsistencyCheckPeriod, is read from
// the environment variable STE_WATCHCACHE_CHECK_PERIOD (a Go duration such
// as "10s") before the server starts.
//
// Upstream hard-codes that period (5 minutes, each wait jittered up to 7.5)
// and offers no flag for it, which puts two checks ~13-15 minutes apart:
// too slow for CI. Nothing else differs: the checker's code (cacher's
// delegator.go: list the watch cache, list storage at the cache's
// resourceVersion, compare digests; panic on a difference when
// KUBE_WATCHCACHE_CONSISTENCY_CHECKER=true), its jitter, and everything the
// server does are upstream's, unmodified, from the same module versions and
// built with the same tags and flags as target/upstream/bin/kube-apiserver
// (hack/build-upstream.sh). The body of main below is upstream's
// cmd/kube-apiserver/apiserver.go with the period assignment added.
//
// Unset, STE_WATCHCACHE_CHECK_PERIOD leaves upstream's 5 minutes; a value
// that is not a positive duration is an error (exit 2), so a typo never
// silently runs with the 5-minute period.
package main

import (
	"fmt"
	"os"
	"time"
	_ "time/tzdata" // for timeZone support in CronJob

	"k8s.io/apiserver/pkg/storage/cacher"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // for JSON log format registration
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // load all the prometheus client-go plugins
	_ "k8s.io/component-base/metrics/prometheus/version"  // for version metric registration
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

// periodEnv names the environment variable with the check period.
const periodEnv = "STE_WATCHCACHE_CHECK_PERIOD"

func main() {
	if text, ok := os.LookupEnv(periodEnv); ok {
		period, err := time.ParseDuration(text)
		if err != nil || period <= 0 {
			fmt.Fprintf(os.Stderr, "%s=%q: want a positive duration such as 10s\n", periodEnv, text)
			os.Exit(2)
		}
		// Set before anything starts: the checkers read it when the
		// watch caches are created.
		cacher.ConsistencyCheckPeriod = period
	}
	command := app.NewAPIServerCommand()
	code := cli.Run(command)
	os.Exit(code)
}
