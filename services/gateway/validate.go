package gateway

import (
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// validate checks a request against the catalog and reports every invalid
// field at once, as a 422.
func (g *Gateway) validate(req api.CreateRequest) (*plan, *api.Problem) {
	var errs extension.FieldErrors
	cat := g.opts.Catalog.Current()
	pl := &plan{}
	if req.Profile == "" {
		errs = append(errs, extension.FieldError{Field: "profile", Detail: "required"})
	} else if p, err := cat.Profile(req.Profile); err != nil {
		errs = append(errs, extension.FieldError{Field: "profile", Detail: fmt.Sprintf("unknown profile %s (known: %s)",
			strconv.Quote(clip(req.Profile)), strings.Join(slices.Sorted(maps.Keys(cat.Profiles)), ", "))})
	} else {
		// A routed profile's request must suit every candidate, so that
		// where it lands never decides whether it is valid.
		names := p.ExtensionNames()
		pl.inputs = make(map[string]extension.Inputs, len(names))
		seen := map[extension.FieldError]bool{}
		for _, name := range names {
			m, err := cat.Extension(name)
			if err != nil {
				errs = append(errs, extension.FieldError{Field: "profile", Detail: fmt.Sprintf("profile %s binds extension %s, which is not in the catalog", p.Slug, name)})
				continue
			}
			pl.manifests = append(pl.manifests, m)
			in, ierrs := m.ValidateInputs(p.Inputs, req.Inputs)
			for _, fe := range ierrs {
				if len(names) > 1 {
					fe.Detail = "extension " + name + ": " + fe.Detail
				}
				if !seen[fe] {
					seen[fe] = true
					errs = append(errs, fe)
				}
			}
			pl.inputs[name] = in
		}
		if len(names) == 0 {
			errs = append(errs, extension.FieldError{Field: "profile", Detail: fmt.Sprintf("profile %s binds no extension", p.Slug)})
		}
		if len(pl.manifests) == len(names) && len(names) > 0 {
			pl.profile, pl.manifest = p, pl.manifests[0]
		}
	}

	if len(req.Labels) > MaxLabels {
		errs = append(errs, extension.FieldError{Field: "labels", Detail: fmt.Sprintf("at most %d labels", MaxLabels)})
	} else {
		if pl.profile != nil && len(pl.profile.Labels) > 0 {
			pl.labels = maps.Clone(pl.profile.Labels)
		}
		for _, k := range slices.Sorted(maps.Keys(req.Labels)) {
			v := req.Labels[k]
			if err := extension.CheckLabel(k, v); err != nil {
				errs = append(errs, extension.FieldError{Field: "labels." + extension.SafeField(k), Detail: clipQuoted(err.Error(), k, v)})
				continue
			}
			if pl.labels == nil {
				pl.labels = make(map[string]string, len(req.Labels))
			}
			pl.labels[k] = v
		}
	}

	if req.TTL == "" {
		if pl.profile != nil {
			pl.ttl = pl.profile.TTL.Default.D()
		}
	} else if d, err := time.ParseDuration(req.TTL); err != nil {
		errs = append(errs, extension.FieldError{Field: "ttl", Detail: fmt.Sprintf("want a duration such as 30m or 2h, got %s", strconv.Quote(clip(req.TTL)))})
	} else if d < time.Second {
		errs = append(errs, extension.FieldError{Field: "ttl", Detail: "must be at least 1s"})
	} else if pl.profile != nil && pl.profile.TTL.Max > 0 && d > pl.profile.TTL.Max.D() {
		errs = append(errs, extension.FieldError{Field: "ttl", Detail: fmt.Sprintf("longer than the profile's maximum of %s", pl.profile.TTL.Max)})
	} else {
		pl.ttl = d
	}

	if len(errs) > 0 {
		return nil, newProblem(http.StatusUnprocessableEntity, "invalid sandbox request", errs...)
	}
	return pl, nil
}

// clip shortens a value of the request for quoting in an answer: at most
// 64 bytes of it, cut at a character.
func clip(s string) string { return clipTo(s, 64) }

// clipTo shortens s to at most n bytes, cut at a character, marked with
// "..." when cut.
func clipTo(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "..."
}

// clipQuoted replaces each of values that msg quotes (as %q does) with
// its clipped quote.
func clipQuoted(msg string, values ...string) string {
	for _, v := range values {
		if len(v) > 64 {
			msg = strings.ReplaceAll(msg, strconv.Quote(v), strconv.Quote(clip(v)))
		}
	}
	return msg
}
