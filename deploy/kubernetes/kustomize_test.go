package kubernetes_test

import (
	"os"
	"path"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	"sigs.k8s.io/kustomize/api/krusty"
	kusttypes "sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

// metricsLine is the commented line of kustomization.yaml that enables
// components/metrics once uncommented.
const metricsLine = "# components: [components/metrics]"

// build runs kustomize (as kubectl apply -k does) on a copy of this
// directory in memory, with edit applied to kustomization.yaml, and decodes
// every resulting resource strictly.
func build(t *testing.T, edit func(string) string) []object {
	t.Helper()
	mem := filesys.MakeFsInMemory()
	for _, f := range manifestFiles(t) {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if f == "kustomization.yaml" {
			b = []byte(edit(string(b)))
		}
		if err := mem.WriteFile(path.Join("/k", f), b); err != nil {
			t.Fatal(err)
		}
	}
	res, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(mem, "/k")
	if err != nil {
		t.Fatalf("kustomize build: %v", err)
	}
	var out []object
	for i, r := range res.Resources() {
		y, err := r.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		kind, v, err := decodeDocument(y)
		if err != nil {
			t.Errorf("built resource %d %s %s: %v", i, kind, r.GetName(), err)
			continue
		}
		if ns := r.GetNamespace(); ns != namespace(t) {
			t.Errorf("built %s %s in namespace %q, want %q", kind, r.GetName(), ns, namespace(t))
		}
		out = append(out, object{file: "(built)", doc: i + 1, kind: kind, v: v})
	}
	return out
}

// kustomization is kustomization.yaml, decoded strictly.
func kustomization(t *testing.T) *kusttypes.Kustomization {
	t.Helper()
	b, err := os.ReadFile("kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var k kusttypes.Kustomization
	if err := decodeStrict(b, &k); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	return &k
}

// namespace is the namespace kustomization.yaml puts everything in.
func namespace(t *testing.T) string {
	t.Helper()
	ns := kustomization(t).Namespace
	if ns == "" {
		t.Fatal("kustomization.yaml sets no namespace")
	}
	return ns
}

// TestKustomizationBuilds builds the kustomization as kubectl apply -k
// would, and checks it lists every manifest beside it (and no example).
func TestKustomizationBuilds(t *testing.T) {
	t.Parallel()
	k := kustomization(t)
	var want []string
	for _, f := range manifestFiles(t) {
		if !strings.Contains(f, "/") && f != "kustomization.yaml" && f != valuesFile {
			want = append(want, f)
		}
	}
	got := slices.Clone(k.Resources)
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("kustomization.yaml resources = %v, want every manifest here: %v", got, want)
	}
	built := build(t, func(s string) string { return s })
	m := &manifests{objects: built}
	if n := len(of[*appsv1.Deployment](m)); n != 5 {
		t.Errorf("built %d Deployments, want 5 (gateway, registry, metering, two pools)", n)
	}
	for _, d := range of[*appsv1.Deployment](m) {
		for _, c := range d.Spec.Template.Spec.Containers {
			if c.Image != image {
				t.Errorf("built %s: image %q, want %q", d.Name, c.Image, image)
			}
		}
	}
}

// TestMetricsComponentIsOneLine uncomments the one line of
// kustomization.yaml that enables components/metrics, and checks that every
// Deployment without an HTTP listener of its own then has --metrics, its
// port, and liveness and readiness probes on it.
func TestMetricsComponentIsOneLine(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile("kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(string(b), metricsLine+"\n") != 1 {
		t.Fatalf("kustomization.yaml has no line %q", metricsLine)
	}
	built := build(t, func(s string) string {
		return strings.Replace(s, metricsLine, strings.TrimPrefix(metricsLine, "# "), 1)
	})
	m := &manifests{objects: built}
	n := 0
	for _, d := range of[*appsv1.Deployment](m) {
		c := d.Spec.Template.Spec.Containers[0]
		if d.Labels[probesLabel] != "metrics" {
			if slices.Contains(c.Args, metricsFlag) {
				t.Errorf("%s has its own listener but got %s", d.Name, metricsFlag)
			}
			continue
		}
		n++
		if !slices.Contains(c.Args, metricsFlag) {
			t.Errorf("%s: no %s in %v", d.Name, metricsFlag, c.Args)
		}
		checkHTTPProbes(t, d.Name, c)
	}
	if n != 4 {
		t.Errorf("the component reached %d Deployments, want 4 (registry, metering, two pools)", n)
	}
}
