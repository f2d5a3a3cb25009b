package kubernetes_test

import (
	"encoding/json"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// scaledObject is KEDA's ScaledObject (keda.sh/v1alpha1) as its
// documentation specifies it, for the fields a ScaledObject may set here.
// KEDA's own module is not imported: it would bring the whole operator.
type scaledObject struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              scaledObjectSpec `json:"spec"`
}

type scaledObjectSpec struct {
	ScaleTargetRef   scaleTargetRef `json:"scaleTargetRef"`
	PollingInterval  *int32         `json:"pollingInterval,omitempty"`
	CooldownPeriod   *int32         `json:"cooldownPeriod,omitempty"`
	IdleReplicaCount *int32         `json:"idleReplicaCount,omitempty"`
	MinReplicaCount  *int32         `json:"minReplicaCount,omitempty"`
	MaxReplicaCount  *int32         `json:"maxReplicaCount,omitempty"`
	Triggers         []scaleTrigger `json:"triggers"`
}

type scaleTargetRef struct {
	APIVersion             string `json:"apiVersion,omitempty"`
	Kind                   string `json:"kind,omitempty"`
	Name                   string `json:"name"`
	EnvSourceContainerName string `json:"envSourceContainerName,omitempty"`
}

type scaleTrigger struct {
	Type              string             `json:"type"`
	Name              string             `json:"name,omitempty"`
	MetricType        string             `json:"metricType,omitempty"`
	UseCachedMetrics  bool               `json:"useCachedMetrics,omitempty"`
	Metadata          map[string]string  `json:"metadata"`
	AuthenticationRef *authenticationRef `json:"authenticationRef,omitempty"`
}

type authenticationRef struct {
	Name string `json:"name"`
	Kind string `json:"kind,omitempty"`
}

// natsJetStreamMetadata are the metadata keys of KEDA's nats-jetstream
// scaler. KEDA ignores a key it does not know (a misspelt lagThreshold
// silently becomes the default 10), so the test refuses any other.
var natsJetStreamMetadata = map[string]bool{
	"natsServerMonitoringEndpoint": true,
	"account":                      true,
	"accountID":                    true,
	"stream":                       true,
	"consumer":                     true,
	"lagThreshold":                 true,
	"activationLagThreshold":       true,
	"useHttps":                     true,
}

// natsValues mirrors the values.yaml of the official NATS Helm chart
// (nats/nats, chart 1.3 and 2.x), for the keys nats-values.yaml sets and no
// others: a key the chart does not have, or one this struct does not cover
// yet, fails the strict decoding. Names, nesting and types follow the
// chart's values.yaml; add a key here, as the chart spells it, before using
// it in nats-values.yaml.
type natsValues struct {
	Config              natsConfig      `json:"config"`
	Container           natsContainer   `json:"container"`
	PodTemplate         natsPodTemplate `json:"podTemplate"`
	PodDisruptionBudget natsEnabled     `json:"podDisruptionBudget"`
	NatsBox             natsBox         `json:"natsBox"`
}

type natsEnabled struct {
	Enabled bool `json:"enabled"`
}

type natsConfig struct {
	Cluster   natsCluster   `json:"cluster"`
	JetStream natsJetStream `json:"jetstream"`
	Monitor   natsMonitor   `json:"monitor"`
	Resolver  natsEnabled   `json:"resolver"`
	// Merge is merged into the server's configuration; only an include is
	// used here.
	Merge natsMerge `json:"merge"`
}

type natsCluster struct {
	Enabled  bool `json:"enabled"`
	Replicas int  `json:"replicas"`
}

type natsJetStream struct {
	Enabled   bool          `json:"enabled"`
	FileStore natsFileStore `json:"fileStore"`
	// Merge is merged into the server's jetstream block.
	Merge natsJetStreamMerge `json:"merge"`
}

// natsJetStreamMerge is what nats-values.yaml merges into the jetstream
// block, spelt as the server's configuration spells it.
type natsJetStreamMerge struct {
	SyncInterval string `json:"sync_interval"`
}

type natsFileStore struct {
	Enabled bool    `json:"enabled"`
	Dir     string  `json:"dir"`
	PVC     natsPVC `json:"pvc"`
}

type natsPVC struct {
	Enabled          bool              `json:"enabled"`
	Size             resource.Quantity `json:"size"`
	StorageClassName *string           `json:"storageClassName,omitempty"`
}

type natsMonitor struct {
	Enabled bool `json:"enabled"`
	Port    int  `json:"port"`
}

type natsMerge struct {
	// Include becomes `include <path>;`, relative to
	// /etc/nats-config/nats.conf.
	Include string `json:"$include"`
}

type natsContainer struct {
	Patch []jsonPatchOp `json:"patch"`
	// Env maps a variable to its value (the chart also takes a map with
	// valueFrom; only strings are used here).
	Env       map[string]string           `json:"env"`
	Resources corev1.ResourceRequirements `json:"resources"`
}

type natsPodTemplate struct {
	Patch []jsonPatchOp `json:"patch"`
	// TopologySpreadConstraints maps a topology key to a constraint; the
	// chart adds topologyKey and labelSelector.
	TopologySpreadConstraints map[string]corev1.TopologySpreadConstraint `json:"topologySpreadConstraints"`
}

type natsBox struct {
	Enabled  bool                      `json:"enabled"`
	Contexts map[string]natsBoxContext `json:"contexts"`
}

type natsBoxContext struct {
	Creds natsBoxSecret `json:"creds"`
}

type natsBoxSecret struct {
	SecretName string `json:"secretName"`
	Key        string `json:"key"`
}

// jsonPatchOp is one operation of a JSON patch (RFC 6902), the chart's
// patch lists. Value is decoded by the test according to Path.
type jsonPatchOp struct {
	Op    string          `json:"op"`
	Path  string          `json:"path"`
	Value json.RawMessage `json:"value,omitempty"`
}
