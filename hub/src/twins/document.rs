//! The twin document: tags, desired and reported properties with their versions and
//! `$metadata`, JSON merge patch (`null` deletes) that stamps `$lastUpdated` (and
//! `$lastUpdatedVersion` in desired) at every level it touches, and the limits a
//! patch must respect (size, depth, key rules).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Limits on twin sections.
#[derive(Debug, Clone, Copy)]
pub struct TwinLimits {
    /// Largest desired or reported section, bytes of JSON.
    pub max_properties_bytes: usize,
    /// Largest tags section, bytes of JSON.
    pub max_tags_bytes: usize,
    /// Deepest object nesting below a section's root.
    pub max_depth: usize,
}

impl Default for TwinLimits {
    fn default() -> Self {
        Self {
            max_properties_bytes: 32 * 1024,
            max_tags_bytes: 8 * 1024,
            max_depth: 10,
        }
    }
}

/// Why a patch was refused (400, with the rule named).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The patch is not a JSON object.
    #[error("{section} must be a JSON object")]
    NotAnObject {
        /// Which section.
        section: &'static str,
    },
    /// A key breaks the key rules.
    #[error(
        "{section}: key {key:?} is not allowed (keys must be non-empty, at most 1024 characters, without '.', '$', spaces or control characters)"
    )]
    BadKey {
        /// Which section.
        section: &'static str,
        /// The key.
        key: String,
    },
    /// Objects nest deeper than allowed.
    #[error("{section}: nesting deeper than {max} levels")]
    TooDeep {
        /// Which section.
        section: &'static str,
        /// The limit.
        max: usize,
    },
    /// The section would exceed its size limit.
    #[error("{section}: {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Which section.
        section: &'static str,
        /// The resulting size.
        size: usize,
        /// The limit.
        max: usize,
    },
}

/// A desired or reported section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Section {
    /// The properties.
    pub properties: Map<String, Value>,
    /// `$metadata`, mirroring `properties`.
    pub metadata: Map<String, Value>,
    /// `$version`: bumped by every patch of this section.
    pub version: u64,
}

/// A device twin as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TwinDocument {
    /// Twin version: bumped by every change of any section.
    pub version: u64,
    /// Service-owned tags.
    pub tags: Map<String, Value>,
    /// Desired properties (service writes, device reads).
    pub desired: Section,
    /// Reported properties (device writes, service reads).
    pub reported: Section,
}

fn key_allowed(key: &str) -> bool {
    !key.is_empty()
        && key.chars().count() <= 1024
        && !key
            .chars()
            .any(|c| c == '.' || c == '$' || c == ' ' || c.is_control())
}

/// Checks keys and depth of a patch (or a full section).
pub fn check_shape(
    section: &'static str,
    value: &Map<String, Value>,
    limits: TwinLimits,
) -> Result<(), PatchError> {
    fn walk(
        section: &'static str,
        map: &Map<String, Value>,
        depth: usize,
        limits: TwinLimits,
    ) -> Result<(), PatchError> {
        if depth > limits.max_depth {
            return Err(PatchError::TooDeep {
                section,
                max: limits.max_depth,
            });
        }
        for (key, value) in map {
            if !key_allowed(key) {
                return Err(PatchError::BadKey {
                    section,
                    key: key.clone(),
                });
            }
            if let Value::Object(child) = value {
                walk(section, child, depth + 1, limits)?;
            }
        }
        Ok(())
    }
    walk(section, value, 1, limits)
}

/// Applies an RFC 7386 merge patch to `target`: `null` deletes, objects merge
/// recursively, anything else replaces.
pub fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(child_patch) => {
                let slot = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(child) = slot {
                    merge(child, child_patch);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

/// Stamps `$metadata` for a patch applied at `now` (RFC 3339) with `version` (desired
/// only): every level the patch touches gets `$lastUpdated`; deleted keys lose their
/// metadata.
fn stamp(
    metadata: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    now: &str,
    version: Option<u64>,
) {
    let mark = |node: &mut Map<String, Value>| {
        node.insert("$lastUpdated".into(), Value::String(now.to_string()));
        if let Some(version) = version {
            node.insert("$lastUpdatedVersion".into(), Value::from(version));
        }
    };
    for (key, value) in patch {
        match value {
            Value::Null => {
                metadata.remove(key);
            }
            Value::Object(child_patch) => {
                let slot = metadata
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(child) = slot {
                    stamp(child, child_patch, now, version);
                    mark(child);
                }
            }
            _ => {
                let mut leaf = Map::new();
                mark(&mut leaf);
                metadata.insert(key.clone(), Value::Object(leaf));
            }
        }
    }
    mark(metadata);
}

/// A stored desired or reported section, `$metadata` included, may be at most this
/// many times the section limit.
pub const STORED_SECTION_FACTOR: usize = 4;

/// How a size error names a section counted with its metadata.
fn with_metadata(section: &'static str) -> &'static str {
    match section {
        "desired" => "desired with $metadata",
        "reported" => "reported with $metadata",
        _ => "section with $metadata",
    }
}

fn json_len(map: &Map<String, Value>) -> usize {
    serde_json::to_vec(map).map_or(usize::MAX, |v| v.len())
}

impl Section {
    /// Applies `patch` at `now`; `desired` sections record `$lastUpdatedVersion`.
    pub fn apply(
        &mut self,
        section: &'static str,
        patch: &Map<String, Value>,
        now: &str,
        desired: bool,
        limits: TwinLimits,
    ) -> Result<(), PatchError> {
        check_shape(section, patch, limits)?;
        let mut properties = self.properties.clone();
        merge(&mut properties, patch);
        check_shape(section, &properties, limits)?;
        let size = json_len(&properties);
        if size > limits.max_properties_bytes {
            return Err(PatchError::TooLarge {
                section,
                size,
                max: limits.max_properties_bytes,
            });
        }
        let version = self.version + 1;
        let mut metadata = self.metadata.clone();
        stamp(&mut metadata, patch, now, desired.then_some(version));
        // Azure does not count `$metadata` in the section limit, but a section of many
        // tiny leaves carries ~10× its size in metadata: the stored section is bounded
        // too, so a device cannot grow its twin far past the limit.
        let stored = size.saturating_add(json_len(&metadata));
        let max_stored = limits
            .max_properties_bytes
            .saturating_mul(STORED_SECTION_FACTOR);
        if stored > max_stored {
            return Err(PatchError::TooLarge {
                section: with_metadata(section),
                size: stored,
                max: max_stored,
            });
        }
        self.metadata = metadata;
        self.properties = properties;
        self.version = version;
        Ok(())
    }

    /// Replaces the whole section (PUT), stamping every key.
    pub fn replace(
        &mut self,
        section: &'static str,
        properties: Map<String, Value>,
        now: &str,
        desired: bool,
        limits: TwinLimits,
    ) -> Result<(), PatchError> {
        // Deleting every current key and setting every new one is the same change
        // as a patch, so the metadata follows the same rules.
        let mut patch: Map<String, Value> = self
            .properties
            .keys()
            .map(|k| (k.clone(), Value::Null))
            .collect();
        patch.extend(properties);
        self.apply(section, &patch, now, desired, limits)
    }

    /// The section as devices and the REST API see it: properties plus
    /// `$version` (and `$metadata` when asked).
    pub fn to_json(&self, with_metadata: bool) -> Value {
        let mut out = self.properties.clone();
        if with_metadata {
            let mut metadata = self.metadata.clone();
            metadata
                .entry("$lastUpdated")
                .or_insert(Value::String("0001-01-01T00:00:00Z".into()));
            out.insert("$metadata".into(), Value::Object(metadata));
        }
        out.insert("$version".into(), Value::from(self.version));
        Value::Object(out)
    }
}

impl Default for TwinDocument {
    fn default() -> Self {
        Self::new()
    }
}

impl TwinDocument {
    /// A new twin: empty sections at version 1, as Azure creates them.
    pub fn new() -> Self {
        Self {
            version: 1,
            tags: Map::new(),
            desired: Section {
                version: 1,
                ..Section::default()
            },
            reported: Section {
                version: 1,
                ..Section::default()
            },
        }
    }

    /// Merges `patch` into the tags.
    pub fn patch_tags(
        &mut self,
        patch: &Map<String, Value>,
        limits: TwinLimits,
    ) -> Result<(), PatchError> {
        check_shape("tags", patch, limits)?;
        let mut tags = self.tags.clone();
        merge(&mut tags, patch);
        check_shape("tags", &tags, limits)?;
        let size = json_len(&tags);
        if size > limits.max_tags_bytes {
            return Err(PatchError::TooLarge {
                section: "tags",
                size,
                max: limits.max_tags_bytes,
            });
        }
        self.tags = tags;
        Ok(())
    }

    /// The device's view (`GET` over MQTT): desired and reported with `$version`, no
    /// metadata, no tags.
    pub fn device_view(&self) -> Value {
        serde_json::json!({
            "desired": self.desired.to_json(false),
            "reported": self.reported.to_json(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn obj(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut target = obj(json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2]}));
        merge(
            &mut target,
            &obj(json!({"a": null, "b": {"c": null, "x": 9}, "e": {"f": 1}, "g": "new"})),
        );
        assert_eq!(
            Value::Object(target),
            json!({"b": {"d": 3, "x": 9}, "e": {"f": 1}, "g": "new"})
        );
    }

    #[test]
    fn applying_a_patch_bumps_the_version_and_stamps_metadata() {
        let mut section = TwinDocument::new().desired;
        section
            .apply(
                "desired",
                &obj(json!({"fan": {"speed": 3}, "mode": "eco"})),
                "2026-01-01T00:00:00Z",
                true,
                TwinLimits::default(),
            )
            .unwrap();
        assert_eq!(section.version, 2);
        let view = section.to_json(true);
        assert_eq!(view["fan"]["speed"], 3);
        assert_eq!(view["$version"], 2);
        assert_eq!(view["$metadata"]["$lastUpdated"], "2026-01-01T00:00:00Z");
        assert_eq!(view["$metadata"]["$lastUpdatedVersion"], 2);
        assert_eq!(
            view["$metadata"]["fan"]["$lastUpdated"],
            "2026-01-01T00:00:00Z"
        );
        assert_eq!(view["$metadata"]["fan"]["speed"]["$lastUpdatedVersion"], 2);
        assert_eq!(
            view["$metadata"]["mode"]["$lastUpdated"],
            "2026-01-01T00:00:00Z"
        );

        section
            .apply(
                "desired",
                &obj(json!({"mode": null})),
                "2026-01-02T00:00:00Z",
                true,
                TwinLimits::default(),
            )
            .unwrap();
        let view = section.to_json(true);
        assert!(view.get("mode").is_none());
        assert!(view["$metadata"].get("mode").is_none());
        assert_eq!(
            view["$metadata"]["fan"]["$lastUpdated"], "2026-01-01T00:00:00Z",
            "untouched levels keep their stamp"
        );

        let mut reported = TwinDocument::new().reported;
        reported
            .apply(
                "reported",
                &obj(json!({"fw": 2})),
                "2026-01-01T00:00:00Z",
                false,
                TwinLimits::default(),
            )
            .unwrap();
        assert!(
            reported.to_json(true)["$metadata"]["fw"]
                .get("$lastUpdatedVersion")
                .is_none()
        );
    }

    #[test]
    fn limits_are_enforced_with_the_rule_named() {
        let limits = TwinLimits::default();
        let mut section = Section::default();
        for (patch, expected) in [
            (json!({"a.b": 1}), "key \"a.b\""),
            (json!({"$x": 1}), "key \"$x\""),
            (json!({"a b": 1}), "key \"a b\""),
            (json!({"": 1}), "key \"\""),
            (
                json!({"big": "x".repeat(33 * 1024)}),
                "exceeds the limit of 32768",
            ),
        ] {
            let err = section
                .apply("reported", &obj(patch), "t", false, limits)
                .unwrap_err();
            assert!(err.to_string().contains(expected), "{err}");
        }
        let mut deep = json!(1);
        for _ in 0..11 {
            deep = json!({ "n": deep });
        }
        let err = section
            .apply("reported", &obj(deep), "t", false, limits)
            .unwrap_err();
        assert!(err.to_string().contains("deeper than 10"), "{err}");
        assert_eq!(
            section,
            Section::default(),
            "a refused patch changes nothing"
        );
        let mut twin = TwinDocument::new();
        let err = twin
            .patch_tags(&obj(json!({"t": "x".repeat(9 * 1024)})), limits)
            .unwrap_err();
        assert!(err.to_string().contains("tags"), "{err}");
    }

    #[test]
    fn metadata_counts_towards_the_stored_size_of_a_section() {
        let limits = TwinLimits::default();
        // 2,500 one-digit leaves: ~25 KB of properties, under the 32 KiB limit, but
        // ~190 KB with their $metadata.
        let patch: Map<String, Value> = (0..2500)
            .map(|i| (format!("k{i:04}"), Value::from(1)))
            .collect();
        assert!(json_len(&patch) < limits.max_properties_bytes);
        let mut section = Section::default();
        let err = section
            .apply("reported", &patch, "2026-11-30T00:00:00Z", false, limits)
            .unwrap_err();
        assert!(
            matches!(err, PatchError::TooLarge { section: "reported with $metadata", max, .. } if max == 4 * limits.max_properties_bytes),
            "{err}"
        );
        assert_eq!(section, Section::default(), "nothing applied");
        // A section of ordinary values fits with its metadata.
        let fits: Map<String, Value> = (0..100)
            .map(|i| {
                (
                    format!("sensor{i}"),
                    Value::from("a reading of some length"),
                )
            })
            .collect();
        section
            .apply("reported", &fits, "2026-11-30T00:00:00Z", false, limits)
            .expect("fits");
    }

    #[test]
    fn replace_removes_absent_keys() {
        let mut section = Section::default();
        section
            .apply(
                "desired",
                &obj(json!({"a": 1, "b": 2})),
                "t1",
                true,
                TwinLimits::default(),
            )
            .unwrap();
        section
            .replace(
                "desired",
                obj(json!({"c": 3})),
                "t2",
                true,
                TwinLimits::default(),
            )
            .unwrap();
        assert_eq!(Value::Object(section.properties.clone()), json!({"c": 3}));
        assert!(section.metadata.get("a").is_none());
        assert_eq!(section.version, 2);
    }

    /// A patch generator: nested objects of small keys with numbers, strings and nulls.
    fn patch_strategy() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<i32>().prop_map(Value::from),
            "[a-z]{0,3}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop::collection::btree_map("[a-d]", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect()))
        })
        .prop_map(|v| match v {
            Value::Object(_) => v,
            other => serde_json::json!({ "k": other }),
        })
    }

    /// The model: a flat map from key paths to leaf values, patched path by path.
    fn flatten(
        prefix: &str,
        value: &Map<String, Value>,
        out: &mut std::collections::BTreeMap<String, Value>,
    ) {
        for (key, value) in value {
            let path = format!("{prefix}/{key}");
            match value {
                Value::Object(child) if !child.is_empty() => flatten(&path, child, out),
                other => {
                    out.insert(path, other.clone());
                }
            }
        }
    }

    fn model_apply(
        model: &mut std::collections::BTreeMap<String, Value>,
        prefix: &str,
        patch: &Map<String, Value>,
    ) {
        for (key, value) in patch {
            let path = format!("{prefix}/{key}");
            let below = format!("{path}/");
            match value {
                Value::Null => model.retain(|k, _| k != &path && !k.starts_with(&below)),
                Value::Object(child) => {
                    // Whatever leaf was at `path` (a value or an empty object) becomes
                    // the object the children merge into.
                    model.remove(&path);
                    model_apply(model, &path, child);
                    if !model.keys().any(|k| k.starts_with(&below)) {
                        model.insert(path, Value::Object(Map::new()));
                    }
                }
                other => {
                    model.retain(|k, _| !k.starts_with(&below));
                    model.insert(path, other.clone());
                }
            }
        }
    }

    proptest! {
        #[test]
        fn merge_patch_matches_a_path_model(patches in prop::collection::vec(patch_strategy(), 1..6)) {
            let mut document = Map::new();
            let mut model = std::collections::BTreeMap::new();
            for patch in &patches {
                let Value::Object(patch) = patch else { unreachable!() };
                merge(&mut document, patch);
                model_apply(&mut model, "", patch);
            }
            let mut flat = std::collections::BTreeMap::new();
            flatten("", &document, &mut flat);
            prop_assert_eq!(flat, model);
        }

        #[test]
        fn metadata_mirrors_the_properties(patches in prop::collection::vec(patch_strategy(), 1..6)) {
            let mut section = Section::default();
            for (i, patch) in patches.iter().enumerate() {
                let Value::Object(patch) = patch else { unreachable!() };
                let _ = section.apply("desired", patch, &format!("t{i}"), true, TwinLimits::default());
            }
            // Every property has metadata and every metadata key is a property.
            fn same_keys(props: &Map<String, Value>, meta: &Map<String, Value>) -> bool {
                let props_keys: std::collections::BTreeSet<&String> = props.keys().collect();
                let meta_keys: std::collections::BTreeSet<&String> = meta.keys().filter(|k| !k.starts_with('$')).collect();
                props_keys == meta_keys
                    && props.iter().all(|(k, v)| match (v, meta.get(k)) {
                        (Value::Object(p), Some(Value::Object(m))) => same_keys(p, m),
                        (_, Some(Value::Object(m))) => m.contains_key("$lastUpdated"),
                        _ => false,
                    })
            }
            prop_assert!(same_keys(&section.properties, &section.metadata));
        }
    }
}
