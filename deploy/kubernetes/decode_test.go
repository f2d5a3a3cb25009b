package kubernetes_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	sigsjson "sigs.k8s.io/json"
	kusttypes "sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/yaml"
)

// valuesFile is the Helm values of the NATS chart: no apiVersion or kind,
// decoded into [natsValues].
const valuesFile = "nats-values.yaml"

// kinds maps each apiVersion and kind the manifests may hold to a new value
// of its type. A document of any other kind fails: a new kind is added here
// with its type, so that it is checked too.
var kinds = map[string]func() any{
	"apps/v1 Deployment":            func() any { return new(appsv1.Deployment) },
	"v1 Service":                    func() any { return new(corev1.Service) },
	"v1 ConfigMap":                  func() any { return new(corev1.ConfigMap) },
	"v1 Secret":                     func() any { return new(corev1.Secret) },
	"v1 PersistentVolumeClaim":      func() any { return new(corev1.PersistentVolumeClaim) },
	"policy/v1 PodDisruptionBudget": func() any { return new(policyv1.PodDisruptionBudget) },
	"batch/v1 Job":                  func() any { return new(batchv1.Job) },
	"keda.sh/v1alpha1 ScaledObject": func() any { return new(scaledObject) },
	"kustomize.config.k8s.io/v1beta1 Kustomization": func() any { return new(kusttypes.Kustomization) },
	"kustomize.config.k8s.io/v1alpha1 Component":    func() any { return new(kusttypes.Kustomization) },
}

// decodeStrict decodes one YAML document into v as the API server does in
// strict mode: field names match case-sensitively, and an unknown or
// repeated field is an error. Every such field is reported, not only the
// first.
func decodeStrict(doc []byte, v any) error {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return fmt.Errorf("converting to JSON: %w", err)
	}
	strict, err := sigsjson.UnmarshalStrict(j, v)
	if err != nil {
		return fmt.Errorf("decoding: %w", err)
	}
	return errors.Join(strict...)
}

// object is one decoded document and where it came from.
type object struct {
	file string // relative to this directory
	doc  int    // 1-based index of the document in file
	kind string // "apiVersion kind"
	v    any    // a pointer to the type kinds gives
}

func (o object) String() string { return fmt.Sprintf("%s#%d (%s)", o.file, o.doc, o.kind) }

// decodeDocument decodes one document by its apiVersion and kind.
func decodeDocument(doc []byte) (string, any, error) {
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return "", nil, fmt.Errorf("reading apiVersion and kind: %w", err)
	}
	key := tm.APIVersion + " " + tm.Kind
	if tm.APIVersion == "" || tm.Kind == "" {
		return key, nil, errors.New("no apiVersion or kind")
	}
	newV, ok := kinds[key]
	if !ok {
		return key, nil, fmt.Errorf("kind %q is not one the test knows: add its type to kinds", key)
	}
	v := newV()
	if err := decodeStrict(doc, v); err != nil {
		return key, nil, err
	}
	return key, v, nil
}

// splitDocuments returns the YAML documents of b that hold more than
// comments.
func splitDocuments(b []byte) ([][]byte, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
	var docs [][]byte
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return docs, nil
		}
		if err != nil {
			return nil, err
		}
		var probe any
		if err := yaml.Unmarshal(doc, &probe); err != nil {
			return nil, err
		}
		if probe != nil {
			docs = append(docs, doc)
		}
	}
}

// manifests is every document of every YAML file under this directory,
// decoded.
type manifests struct {
	objects []object
	values  *natsValues
}

// yamlFiles lists the YAML files under dir, relative to it, sorted.
func yamlFiles(dir string) ([]string, error) {
	var files []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && p != dir && (d.Name() == "testdata" || strings.HasPrefix(d.Name(), ".")) {
			return filepath.SkipDir
		}
		if !d.IsDir() && (strings.HasSuffix(p, ".yaml") || strings.HasSuffix(p, ".yml")) {
			rel, err := filepath.Rel(dir, p)
			if err != nil {
				return err
			}
			files = append(files, filepath.ToSlash(rel))
		}
		return nil
	})
	slices.Sort(files)
	return files, err
}

// readManifests decodes every document of every YAML file under dir. It
// returns every problem found, not only the first.
func readManifests(dir string) (*manifests, []error) {
	m := &manifests{}
	files, err := yamlFiles(dir)
	if err != nil {
		return nil, []error{err}
	}
	if len(files) == 0 {
		return nil, []error{fmt.Errorf("no YAML files under %s", dir)}
	}
	var errs []error
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if f == valuesFile {
			var v natsValues
			if err := decodeStrict(b, &v); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", f, err))
				continue
			}
			m.values = &v
			continue
		}
		docs, err := splitDocuments(b)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: splitting documents: %w", f, err))
			continue
		}
		if len(docs) == 0 {
			errs = append(errs, fmt.Errorf("%s: no documents", f))
		}
		for i, doc := range docs {
			kind, v, err := decodeDocument(doc)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s#%d (%s): %w", f, i+1, kind, err))
				continue
			}
			m.objects = append(m.objects, object{file: f, doc: i + 1, kind: kind, v: v})
		}
	}
	if m.values == nil && len(errs) == 0 {
		errs = append(errs, fmt.Errorf("no %s", valuesFile))
	}
	return m, errs
}

// here is this directory's manifests, read once.
var here = sync.OnceValues(func() (*manifests, []error) { return readManifests(".") })

// loadManifests returns this directory's manifests. TestManifestsDecodeStrictly
// reports what does not decode; the other tests stop at once then.
func loadManifests(t *testing.T) *manifests {
	t.Helper()
	m, errs := here()
	if len(errs) > 0 {
		t.Fatalf("%d manifest documents do not decode (see TestManifestsDecodeStrictly)", len(errs))
	}
	return m
}

// manifestFiles lists this directory's YAML files, or fails.
func manifestFiles(t *testing.T) []string {
	t.Helper()
	names, err := yamlFiles(".")
	if err != nil {
		t.Fatal(err)
	}
	return names
}

// of returns the objects of type T.
func of[T any](m *manifests) []T {
	var out []T
	for _, o := range m.objects {
		if v, ok := o.v.(T); ok {
			out = append(out, v)
		}
	}
	return out
}

// where names the file and document of v.
func (m *manifests) where(v any) string {
	for _, o := range m.objects {
		if o.v == v {
			return o.String()
		}
	}
	return "?"
}

// TestManifestsDecodeStrictly walks every YAML document of every file here
// and decodes it strictly into its type.
func TestManifestsDecodeStrictly(t *testing.T) {
	t.Parallel()
	m, errs := here()
	for _, err := range errs {
		t.Error(err)
	}
	if m == nil {
		return
	}
	count := map[string]int{}
	for _, o := range m.objects {
		count[o.kind]++
	}
	// What the directory must hold at least; a file lost fails here.
	for kind, min := range map[string]int{
		"apps/v1 Deployment":                            6,
		"v1 Service":                                    1,
		"v1 PersistentVolumeClaim":                      2,
		"policy/v1 PodDisruptionBudget":                 6,
		"batch/v1 Job":                                  1,
		"keda.sh/v1alpha1 ScaledObject":                 3,
		"kustomize.config.k8s.io/v1beta1 Kustomization": 1,
		"kustomize.config.k8s.io/v1alpha1 Component":    1,
	} {
		if count[kind] < min {
			t.Errorf("%d documents of %s, want at least %d", count[kind], kind, min)
		}
	}
}

// TestStrictDecodingRefusesMistakes proves the decoding strict: a misspelt,
// miscased or repeated field fails, where a lenient decoder would drop it.
func TestStrictDecodingRefusesMistakes(t *testing.T) {
	t.Parallel()
	const pdb = `apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: x
spec:
  %s: 1
  selector:
    matchLabels: {app: x}
`
	const deployment = `apiVersion: apps/v1
kind: Deployment
metadata:
  name: x
spec:
  selector:
    matchLabels: {app: x}
  template:
    metadata:
      labels: {app: x}
    spec:
      containers:
        - name: x
          image: sandboxer:dev
          securityContext:
            %s: true
`
	const scaled = `apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: x
spec:
  scaleTargetRef:
    name: x
  %s: 4
  triggers:
    - type: nats-jetstream
      metadata:
        stream: S
`
	cases := []struct {
		name, doc string
		ok        bool
	}{
		{"pdb as written", fmt.Sprintf(pdb, "minAvailable"), true},
		{"pdb field misspelt", fmt.Sprintf(pdb, "minAvailble"), false},
		{"pdb field miscased", fmt.Sprintf(pdb, "MinAvailable"), false},
		{"pdb field repeated", fmt.Sprintf(pdb, "minAvailable: 1\n  minAvailable"), false},
		{"deployment as written", fmt.Sprintf(deployment, "readOnlyRootFilesystem"), true},
		{"deployment nested field misspelt", fmt.Sprintf(deployment, "readOnlyRootFileSystem"), false},
		{"scaled object as written", fmt.Sprintf(scaled, "maxReplicaCount"), true},
		{"scaled object field misspelt", fmt.Sprintf(scaled, "maxReplicas"), false},
		{"unknown kind", "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n", false},
		{"no kind", "metadata: {name: x}\n", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			_, _, err := decodeDocument([]byte(c.doc))
			if c.ok && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !c.ok && err == nil {
				t.Fatal("accepted")
			}
		})
	}
	t.Run("values field misspelt", func(t *testing.T) {
		t.Parallel()
		var v natsValues
		if err := decodeStrict([]byte("config:\n  cluster:\n    replica: 3\n"), &v); err == nil {
			t.Fatal("accepted")
		}
	})
	t.Run("values include misspelt", func(t *testing.T) {
		t.Parallel()
		var v natsValues
		if err := decodeStrict([]byte("config:\n  merge:\n    $inlcude: ../x.conf\n"), &v); err == nil {
			t.Fatal("accepted")
		}
	})
}

// decodePatchValue decodes the value of a JSON patch operation strictly
// into v.
func decodePatchValue(raw json.RawMessage, v any) error {
	strict, err := sigsjson.UnmarshalStrict(raw, v)
	if err != nil {
		return err
	}
	return errors.Join(strict...)
}
