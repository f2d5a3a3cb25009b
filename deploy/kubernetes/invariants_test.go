package kubernetes_test

import (
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"
)

const (
	// image is the one image every container runs.
	image = "sandboxer:dev"
	// natsURL is the client Service of the chart's release "nats".
	natsURL = "nats://nats:4222"
	// credsDir is where each process's .creds Secret is mounted.
	credsDir = "/etc/sandboxer/creds"
	// catalogConfigMap holds the ext.*.yaml and profile.*.yaml files that
	// the registry serves and setup makes durables for.
	catalogConfigMap = "sandboxer-catalog"
	// adminSecret holds admin.creds, for setup and nats-box.
	adminSecret = "sandboxer-creds-admin"
	// authSecret holds the output of sandboxer creds server-config.
	authSecret = "nats-auth"
	// resolverDir is the --resolver-dir of creds server-config in the README.
	resolverDir = "/data/jwt"
	// probesLabel marks a Deployment without an HTTP listener of its own,
	// which components/metrics gives --metrics and probes.
	probesLabel = "sandboxer.dev/probes"
	metricsFlag = "--metrics=:9090"
	// drainSeconds is how long a process drains on SIGTERM at most
	// (cmd/sandboxer serveRun's shutdown deadline).
	drainSeconds = 30
	// commandsStream is the stream of the pools' durables.
	commandsStream = "SANDBOXER_COMMANDS"
	// accountName is the name of the application account (pkg/auth).
	accountName = "SANDBOXER"
)

// flags parses --name=value arguments; a repeated flag keeps every value.
func flags(args []string) map[string][]string {
	out := map[string][]string{}
	for _, a := range args {
		if k, v, ok := strings.Cut(a, "="); ok && strings.HasPrefix(k, "--") {
			out[k] = append(out[k], v)
		}
	}
	return out
}

// one returns the single value of flag k, or fails.
func one(t *testing.T, where string, f map[string][]string, k string) string {
	t.Helper()
	if len(f[k]) != 1 {
		t.Errorf("%s: want exactly one %s=VALUE, have %q", where, k, f[k])
		return ""
	}
	return f[k][0]
}

// checkHTTPProbes checks c has liveness on /healthz and readiness on
// /readyz, on a port it declares.
func checkHTTPProbes(t *testing.T, where string, c corev1.Container) {
	t.Helper()
	for _, p := range []struct {
		name  string
		probe *corev1.Probe
		path  string
	}{{"livenessProbe", c.LivenessProbe, "/healthz"}, {"readinessProbe", c.ReadinessProbe, "/readyz"}} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("%s: container %s has a port but no HTTP %s", where, c.Name, p.name)
			continue
		}
		if p.probe.HTTPGet.Path != p.path {
			t.Errorf("%s: %s on %q, want %q", where, p.name, p.probe.HTTPGet.Path, p.path)
		}
		port := p.probe.HTTPGet.Port.String()
		if !slices.ContainsFunc(c.Ports, func(cp corev1.ContainerPort) bool {
			return cp.Name == port || strconv.Itoa(int(cp.ContainerPort)) == port
		}) {
			t.Errorf("%s: %s on port %q, which the container does not declare", where, p.name, port)
		}
	}
}

// checkPodSecurity checks the pod and every container run as non-root with
// a read-only root, no privilege escalation, no capabilities and the
// runtime's seccomp profile, and that each container has requests and a
// memory limit and runs the image.
func checkPodSecurity(t *testing.T, where string, spec corev1.PodSpec) {
	t.Helper()
	psc := spec.SecurityContext
	if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot {
		t.Errorf("%s: pod securityContext.runAsNonRoot is not true", where)
	}
	if psc == nil || psc.RunAsUser == nil || *psc.RunAsUser == 0 {
		t.Errorf("%s: pod securityContext.runAsUser is not a non-root uid (the image, FROM scratch, names no user)", where)
	}
	if psc == nil || psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("%s: pod seccompProfile is not RuntimeDefault", where)
	}
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Errorf("%s: automountServiceAccountToken is not false (nothing here talks to the Kubernetes API)", where)
	}
	if len(spec.InitContainers) > 0 {
		t.Errorf("%s: init containers are not checked by this test", where)
	}
	for _, c := range spec.Containers {
		w := where + " container " + c.Name
		if c.Image != image {
			t.Errorf("%s: image %q, want %q", w, c.Image, image)
		}
		sc := c.SecurityContext
		if sc == nil {
			sc = &corev1.SecurityContext{}
		}
		if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			t.Errorf("%s: allowPrivilegeEscalation is not false", w)
		}
		if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Errorf("%s: readOnlyRootFilesystem is not true", w)
		}
		if sc.Privileged != nil && *sc.Privileged {
			t.Errorf("%s: privileged", w)
		}
		if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) > 0 {
			t.Errorf("%s: capabilities are not drop [ALL], add none", w)
		}
		for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
			if q, ok := c.Resources.Requests[r]; !ok || q.IsZero() {
				t.Errorf("%s: no %s request", w, r)
			}
		}
		if q, ok := c.Resources.Limits[corev1.ResourceMemory]; !ok || q.IsZero() {
			t.Errorf("%s: no memory limit", w)
		}
		if f := flags(c.Args); len(f["--nats"]) > 0 && f["--nats"][0] != natsURL {
			t.Errorf("%s: --nats=%s, want %s", w, f["--nats"][0], natsURL)
		}
	}
}

// mountedFrom returns the volume mounted at dir in c.
func mountedFrom(spec corev1.PodSpec, c corev1.Container, dir string) *corev1.Volume {
	for _, vm := range c.VolumeMounts {
		if vm.MountPath != dir {
			continue
		}
		for i := range spec.Volumes {
			if spec.Volumes[i].Name == vm.Name {
				return &spec.Volumes[i]
			}
		}
	}
	return nil
}

// checkCreds checks that c connects with --creds=<credsDir>/<identity>.creds
// from the Secret sandboxer-creds-<identity>, and returns the identity.
func checkCreds(t *testing.T, where string, spec corev1.PodSpec, c corev1.Container) string {
	t.Helper()
	f := flags(c.Args)
	if one(t, where, f, "--nats") != natsURL {
		t.Errorf("%s: not connected to %s", where, natsURL)
	}
	creds := one(t, where, f, "--creds")
	if path.Dir(creds) != credsDir || !strings.HasSuffix(creds, ".creds") {
		t.Errorf("%s: --creds=%s, want %s/<identity>.creds", where, creds, credsDir)
		return ""
	}
	id := strings.TrimSuffix(path.Base(creds), ".creds")
	v := mountedFrom(spec, c, credsDir)
	switch {
	case v == nil || v.Secret == nil:
		t.Errorf("%s: no Secret mounted at %s", where, credsDir)
	case v.Secret.SecretName != "sandboxer-creds-"+id:
		t.Errorf("%s: creds Secret %q, want sandboxer-creds-%s (one Secret per identity)", where, v.Secret.SecretName, id)
	case len(v.Secret.Items) > 0:
		t.Errorf("%s: the creds Secret maps items: the key must be the file name %s.creds", where, id)
	}
	return id
}

// checkCatalog checks that --extensions and --profiles, when given, both
// name the catalog ConfigMap's mount, and reports whether they are given.
func checkCatalog(t *testing.T, where string, spec corev1.PodSpec, c corev1.Container) bool {
	t.Helper()
	f := flags(c.Args)
	if len(f["--extensions"]) == 0 && len(f["--profiles"]) == 0 {
		return false
	}
	ext, prof := one(t, where, f, "--extensions"), one(t, where, f, "--profiles")
	if ext != prof {
		t.Errorf("%s: --extensions=%s and --profiles=%s: the catalog ConfigMap holds both", where, ext, prof)
	}
	if v := mountedFrom(spec, c, ext); v == nil || v.ConfigMap == nil || v.ConfigMap.Name != catalogConfigMap {
		t.Errorf("%s: %s is not the ConfigMap %s", where, ext, catalogConfigMap)
	}
	return true
}

// manifestConcurrency reads workers.concurrency of the shipped manifest of
// extension ext (the pool-wide cap, the durable's max_ack_pending).
func manifestConcurrency(t *testing.T, ext string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "extensions", "ext."+ext+".yaml"))
	if err != nil {
		t.Errorf("pool %s: %v", ext, err)
		return 0
	}
	var m struct {
		Workers struct {
			Concurrency int `json:"concurrency"`
		} `json:"workers"`
	}
	if err := yaml.Unmarshal(b, &m); err != nil {
		t.Errorf("ext.%s.yaml: %v", ext, err)
		return 0
	}
	if m.Workers.Concurrency == 0 {
		return 8 // the manifest loader's default
	}
	return m.Workers.Concurrency
}

// selects reports whether the PodDisruptionBudget selects exactly the pods
// of d.
func selects(p *policyv1.PodDisruptionBudget, d *appsv1.Deployment) bool {
	return p.Spec.Selector != nil && equality.Semantic.DeepEqual(p.Spec.Selector, d.Spec.Selector)
}

// TestDeployments checks every Deployment (the examples' too): security,
// resources, image, a drain that ends before the kill, probes where there
// is an HTTP port, its own credentials, and a PodDisruptionBudget.
func TestDeployments(t *testing.T) {
	t.Parallel()
	m := loadManifests(t)
	pdbs := of[*policyv1.PodDisruptionBudget](m)
	for _, d := range of[*appsv1.Deployment](m) {
		w := m.where(d)
		spec := d.Spec.Template.Spec
		sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
		if err != nil || sel.Empty() || !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
			t.Errorf("%s: selector %v does not select its own pods (%v)", w, d.Spec.Selector, err)
		}
		checkPodSecurity(t, w, spec)
		if len(spec.Containers) != 1 {
			t.Errorf("%s: %d containers, want one", w, len(spec.Containers))
			continue
		}
		c := spec.Containers[0]
		if len(c.Args) < 2 || c.Args[0] != "serve" {
			t.Errorf("%s: args %v, want serve <service> ...", w, c.Args)
			continue
		}
		service := c.Args[1]

		// The drain: a preStop sleep (the image has no shell and no sleep
		// binary), then SIGTERM and at most drainSeconds of drain, all
		// inside the grace period.
		if c.Lifecycle == nil || c.Lifecycle.PreStop == nil || c.Lifecycle.PreStop.Sleep == nil || c.Lifecycle.PreStop.Sleep.Seconds <= 0 {
			t.Errorf("%s: no preStop sleep", w)
		} else if g := spec.TerminationGracePeriodSeconds; g == nil || *g < c.Lifecycle.PreStop.Sleep.Seconds+drainSeconds+5 {
			grace := "unset (30s)"
			if g != nil {
				grace = fmt.Sprintf("%ds", *g)
			}
			t.Errorf("%s: terminationGracePeriodSeconds %s, want at least preStop %ds + drain %ds + 5s", w, grace, c.Lifecycle.PreStop.Sleep.Seconds, drainSeconds)
		}

		// Probes: on the HTTP port where there is one; else the Deployment
		// is one components/metrics gives a listener and probes.
		if len(c.Ports) > 0 {
			checkHTTPProbes(t, w, c)
		} else {
			if d.Labels[probesLabel] != "metrics" {
				t.Errorf("%s: no HTTP port and no label %s=metrics for components/metrics", w, probesLabel)
			}
			if c.LivenessProbe != nil || c.ReadinessProbe != nil || c.StartupProbe != nil {
				t.Errorf("%s: probes without a port to probe", w)
			}
		}

		id := checkCreds(t, w, spec, c)
		switch service {
		case "gateway", "registry", "metering":
			if id != service {
				t.Errorf("%s: %s runs as %q, want its own identity %q", w, service, id, service)
			}
			if d.Spec.Replicas == nil || *d.Spec.Replicas < 2 {
				t.Errorf("%s: %s has fewer than 2 replicas", w, service)
			}
		case "provisioner":
			ext := one(t, w, flags(c.Args), "--extension")
			if id != "provisioner-"+ext {
				t.Errorf("%s: pool %s runs as %q, want provisioner-%s", w, ext, id, ext)
			}
			if d.Spec.Replicas != nil {
				t.Errorf("%s: a pool sets replicas; its ScaledObject owns them", w)
			}
			if dir := one(t, w, flags(c.Args), "--data-dir"); mountedFrom(spec, c, dir) == nil {
				t.Errorf("%s: --data-dir=%s is not a volume (the root filesystem is read-only)", w, dir)
			}
		default:
			t.Errorf("%s: unknown service %q", w, service)
		}
		if checkCatalog(t, w, spec, c) != (service == "registry") {
			t.Errorf("%s: only the registry (and setup) read the catalog ConfigMap", w)
		}

		n := 0
		for _, p := range pdbs {
			if selects(p, d) {
				n++
				if p.Spec.MinAvailable == nil || p.Spec.MinAvailable.IntValue() != 1 || p.Spec.MaxUnavailable != nil {
					t.Errorf("%s: PodDisruptionBudget %s is not minAvailable: 1", w, p.Name)
				}
			}
		}
		if n != 1 {
			t.Errorf("%s: %d PodDisruptionBudgets select its pods, want 1", w, n)
		}
	}
	for _, p := range pdbs {
		if !slices.ContainsFunc(of[*appsv1.Deployment](m), func(d *appsv1.Deployment) bool { return selects(p, d) }) {
			t.Errorf("%s: selects no Deployment", m.where(p))
		}
	}
}

// TestPools checks every provisioner Deployment has a ScaledObject on its
// own durable's lag, sized by its per-pod concurrency and its manifest's
// pool-wide cap, and every ScaledObject has its pool.
func TestPools(t *testing.T) {
	t.Parallel()
	m := loadManifests(t)
	ns := namespace(t)
	endpoint := fmt.Sprintf("nats-headless.%s.svc.cluster.local:%d", ns, m.values.Config.Monitor.Port)
	scaled := of[*scaledObject](m)
	accounts := map[string]bool{}
	pools := 0
	for _, d := range of[*appsv1.Deployment](m) {
		c := d.Spec.Template.Spec.Containers[0]
		if len(c.Args) < 2 || c.Args[1] != "provisioner" {
			continue
		}
		pools++
		w := m.where(d)
		f := flags(c.Args)
		ext := one(t, w, f, "--extension")
		conc, err := strconv.Atoi(one(t, w, f, "--concurrency"))
		if err != nil || conc < 1 {
			t.Errorf("%s: --concurrency is not a positive number: %v", w, err)
			continue
		}
		var so *scaledObject
		for _, s := range scaled {
			if s.Spec.ScaleTargetRef.Name == d.Name {
				if so != nil {
					t.Errorf("%s: two ScaledObjects", w)
				}
				so = s
			}
		}
		if so == nil {
			t.Errorf("%s: no ScaledObject scales pool %s", w, ext)
			continue
		}
		sw := m.where(so)
		if r := so.Spec.ScaleTargetRef; r.APIVersion != "apps/v1" || r.Kind != "Deployment" {
			t.Errorf("%s: scaleTargetRef %s %s, want apps/v1 Deployment", sw, r.APIVersion, r.Kind)
		}
		// At least two pods, so that the budget (minAvailable 1) lets a
		// node drain; no more than the pool-wide cap has work for.
		minR, maxR := so.Spec.MinReplicaCount, so.Spec.MaxReplicaCount
		if minR == nil || *minR < 2 {
			t.Errorf("%s: minReplicaCount %v, want at least 2", sw, minR)
		}
		if maxR == nil || minR == nil || *maxR < *minR {
			t.Errorf("%s: maxReplicaCount %v below minReplicaCount", sw, maxR)
		} else if limit := manifestConcurrency(t, ext); int(*maxR)*conc > limit {
			t.Errorf("%s: %d pods of --concurrency=%d exceed ext.%s's workers.concurrency %d: the extra pods would get nothing", sw, *maxR, conc, ext, limit)
		}
		if len(so.Spec.Triggers) != 1 {
			t.Errorf("%s: %d triggers, want one", sw, len(so.Spec.Triggers))
			continue
		}
		tr := so.Spec.Triggers[0]
		if tr.Type != "nats-jetstream" {
			t.Errorf("%s: trigger %q, want nats-jetstream", sw, tr.Type)
		}
		for k := range tr.Metadata {
			if !natsJetStreamMetadata[k] {
				t.Errorf("%s: metadata %q is not a nats-jetstream scaler parameter", sw, k)
			}
		}
		want := map[string]string{
			"natsServerMonitoringEndpoint": endpoint,
			"stream":                       commandsStream,
			"consumer":                     "provisioner-" + ext,
			// One pod per --concurrency of lag (pending plus in flight).
			"lagThreshold": strconv.Itoa(conc),
		}
		for k, v := range want {
			if tr.Metadata[k] != v {
				t.Errorf("%s: %s = %q, want %q", sw, k, tr.Metadata[k], v)
			}
		}
		// In operator mode /jsz names an account by its JWT's name and
		// gives its public key as id; KEDA asks for accountID and matches
		// either, so account alone (a name) would find nothing.
		if tr.Metadata["accountID"] == "" {
			t.Errorf("%s: no accountID (the SANDBOXER account's public key)", sw)
		}
		if a, ok := tr.Metadata["account"]; ok && a != accountName {
			t.Errorf("%s: account %q, want the account's name %s", sw, a, accountName)
		}
		accounts[tr.Metadata["accountID"]] = true
	}
	if pools < 3 {
		t.Errorf("%d pools, want local, saas-stub and the compose-ssh example", pools)
	}
	if len(accounts) != 1 {
		t.Errorf("the ScaledObjects name %d accounts, want the one SANDBOXER account: %v", len(accounts), accounts)
	}
	for _, s := range scaled {
		if !slices.ContainsFunc(of[*appsv1.Deployment](m), func(d *appsv1.Deployment) bool { return d.Name == s.Spec.ScaleTargetRef.Name }) {
			t.Errorf("%s: scales %q, which is no Deployment here", m.where(s), s.Spec.ScaleTargetRef.Name)
		}
	}
}

// TestGatewayService checks the Service reaches the gateway's HTTP port.
func TestGatewayService(t *testing.T) {
	t.Parallel()
	m := loadManifests(t)
	services := of[*corev1.Service](m)
	if len(services) != 1 {
		t.Fatalf("%d Services, want the gateway's", len(services))
	}
	s := services[0]
	var gw *appsv1.Deployment
	for _, d := range of[*appsv1.Deployment](m) {
		if labels.SelectorFromSet(s.Spec.Selector).Matches(labels.Set(d.Spec.Template.Labels)) {
			if gw != nil {
				t.Fatalf("%s selects more than one Deployment", m.where(s))
			}
			gw = d
		}
	}
	if gw == nil || gw.Spec.Template.Spec.Containers[0].Args[1] != "gateway" {
		t.Fatalf("%s does not select the gateway", m.where(s))
	}
	c := gw.Spec.Template.Spec.Containers[0]
	for _, p := range s.Spec.Ports {
		if !slices.ContainsFunc(c.Ports, func(cp corev1.ContainerPort) bool { return cp.Name == p.TargetPort.String() }) {
			t.Errorf("%s: targetPort %q is no named port of the gateway", m.where(s), p.TargetPort.String())
		}
	}
	http := one(t, m.where(gw), flags(c.Args), "--http")
	if !strings.HasPrefix(http, ":") || !slices.ContainsFunc(c.Ports, func(cp corev1.ContainerPort) bool { return ":"+strconv.Itoa(int(cp.ContainerPort)) == http }) {
		t.Errorf("%s: --http=%s is not all interfaces on the declared port", m.where(gw), http)
	}
}

// TestSetupJob checks the Job runs setup as the admin, with the cluster's
// replicas and the registry's catalog.
func TestSetupJob(t *testing.T) {
	t.Parallel()
	m := loadManifests(t)
	jobs := of[*batchv1.Job](m)
	if len(jobs) != 1 {
		t.Fatalf("%d Jobs, want the setup Job", len(jobs))
	}
	j := jobs[0]
	w := m.where(j)
	spec := j.Spec.Template.Spec
	checkPodSecurity(t, w, spec)
	if len(spec.Containers) != 1 {
		t.Fatalf("%s: %d containers", w, len(spec.Containers))
	}
	c := spec.Containers[0]
	if len(c.Args) == 0 || c.Args[0] != "setup" {
		t.Fatalf("%s: args %v, want setup ...", w, c.Args)
	}
	if id := checkCreds(t, w, spec, c); "sandboxer-creds-"+id != adminSecret {
		t.Errorf("%s: setup runs as %q, want admin", w, id)
	}
	if r := one(t, w, flags(c.Args), "--replicas"); r != strconv.Itoa(m.values.Config.Cluster.Replicas) {
		t.Errorf("%s: --replicas=%s on a cluster of %d", w, r, m.values.Config.Cluster.Replicas)
	}
	if !checkCatalog(t, w, spec, c) {
		t.Errorf("%s: setup reads no catalog: outside a clone it finds no extensions/ (the pools' durables)", w)
	}
	if spec.RestartPolicy != corev1.RestartPolicyNever && spec.RestartPolicy != corev1.RestartPolicyOnFailure {
		t.Errorf("%s: restartPolicy %q", w, spec.RestartPolicy)
	}
}

// TestNATSValues checks the chart's values against what sand-boxer needs:
// three JetStream nodes on volumes, the authority's configuration included
// from the nats-auth Secret where the chart's include points, the resolver
// directory on the JetStream volume, nats-box as the admin.
func TestNATSValues(t *testing.T) {
	t.Parallel()
	m := loadManifests(t)
	v := m.values
	cfg := v.Config
	if !cfg.Cluster.Enabled || cfg.Cluster.Replicas != 3 {
		t.Errorf("cluster enabled %v, replicas %d: want a three-node cluster", cfg.Cluster.Enabled, cfg.Cluster.Replicas)
	}
	js := cfg.JetStream
	if !js.Enabled || !js.FileStore.Enabled || !js.FileStore.PVC.Enabled || js.FileStore.PVC.Size.IsZero() {
		t.Errorf("jetstream %+v: want file storage on a volume", js)
	}
	if js.Merge.SyncInterval != "always" {
		t.Errorf("jetstream sync_interval %q: want always, every write on disk before it is acknowledged (docs/operations.md)", js.Merge.SyncInterval)
	}
	if !strings.HasPrefix(resolverDir, strings.TrimSuffix(js.FileStore.Dir, "/")+"/") {
		t.Errorf("the resolver directory %s is not on the JetStream volume %s", resolverDir, js.FileStore.Dir)
	}
	if !cfg.Monitor.Enabled || cfg.Monitor.Port == 0 {
		t.Error("monitoring is off: KEDA's scaler reads /jsz")
	}
	if cfg.Resolver.Enabled {
		t.Error("the chart's resolver is on: auth.conf brings its own, and the server would see two")
	}
	if v.PodDisruptionBudget.Enabled != true {
		t.Error("the chart's PodDisruptionBudget is off")
	}

	// The include, the mount and the Secret line up.
	var mounts []corev1.VolumeMount
	for i, op := range v.Container.Patch {
		var vm corev1.VolumeMount
		if op.Op != "add" || op.Path != "/volumeMounts/-" {
			t.Errorf("container.patch[%d]: %s %s is not a volume mount this test knows", i, op.Op, op.Path)
		} else if err := decodePatchValue(op.Value, &vm); err != nil {
			t.Errorf("container.patch[%d]: %v", i, err)
		} else {
			mounts = append(mounts, vm)
		}
	}
	volumes := map[string]corev1.Volume{}
	for i, op := range v.PodTemplate.Patch {
		var vol corev1.Volume
		if op.Op != "add" || op.Path != "/spec/volumes/-" {
			t.Errorf("podTemplate.patch[%d]: %s %s is not a volume this test knows", i, op.Op, op.Path)
		} else if err := decodePatchValue(op.Value, &vol); err != nil {
			t.Errorf("podTemplate.patch[%d]: %v", i, err)
		} else {
			volumes[vol.Name] = vol
		}
	}
	include := path.Clean(path.Join("/etc/nats-config", cfg.Merge.Include))
	found := false
	for _, vm := range mounts {
		vol, ok := volumes[vm.Name]
		if !ok || vol.Secret == nil || vol.Secret.SecretName != authSecret {
			continue
		}
		found = true
		if include != path.Join(vm.MountPath, "auth.conf") {
			t.Errorf("config.merge includes %s, but the Secret %s is at %s/auth.conf", include, authSecret, vm.MountPath)
		}
		// The chart's reloader mounts (and so watches) the nats
		// container's mounts under /etc/ (reloader.natsVolumeMountPrefixes).
		if !strings.HasPrefix(vm.MountPath, "/etc/") {
			t.Errorf("the Secret %s is mounted at %s: outside /etc/ the config reloader does not see it", authSecret, vm.MountPath)
		}
	}
	if !found {
		t.Errorf("no volume from the Secret %s is mounted in the nats container", authSecret)
	}
	for key, tsc := range v.PodTemplate.TopologySpreadConstraints {
		if tsc.TopologyKey != "" || tsc.LabelSelector != nil {
			t.Errorf("topologySpreadConstraints[%s]: the chart sets topologyKey and labelSelector itself", key)
		}
	}
	if lim := v.Container.Resources.Limits.Memory(); lim.IsZero() || v.Container.Env["GOMEMLIMIT"] == "" {
		t.Error("the nats container has no memory limit or no GOMEMLIMIT below it")
	}
	box := v.NatsBox.Contexts["default"].Creds
	if v.NatsBox.Enabled && (box.SecretName != adminSecret || box.Key != "admin.creds") {
		t.Errorf("nats-box's default context uses %s/%s, want %s/admin.creds", box.SecretName, box.Key, adminSecret)
	}
}

// TestReadme checks the README says how to make every Secret and ConfigMap
// the manifests and the values refer to, and names the placeholders.
func TestReadme(t *testing.T) {
	t.Parallel()
	m := loadManifests(t)
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)
	want := map[string]string{
		authSecret:                           "the values",
		adminSecret:                          "the values",
		"--resolver-dir " + resolverDir:      "the values",
		"helm install nats ":                 "the release name behind " + natsURL,
		"kubectl apply -k deploy/kubernetes": "the kustomization",
	}
	for _, o := range m.objects {
		if strings.HasPrefix(o.file, "examples/") {
			continue
		}
		var spec *corev1.PodSpec
		switch v := o.v.(type) {
		case *appsv1.Deployment:
			spec = &v.Spec.Template.Spec
		case *batchv1.Job:
			spec = &v.Spec.Template.Spec
		case *scaledObject:
			for _, tr := range v.Spec.Triggers {
				want[tr.Metadata["accountID"]] = o.String() + " (a placeholder)"
			}
		}
		if spec == nil {
			continue
		}
		for _, vol := range spec.Volumes {
			switch {
			case vol.Secret != nil:
				want[vol.Secret.SecretName] = o.String()
			case vol.ConfigMap != nil:
				want[vol.ConfigMap.Name] = o.String()
			}
		}
	}
	for s, from := range want {
		if !strings.Contains(readme, s) {
			t.Errorf("README.md does not mention %q (%s)", s, from)
		}
	}
}
