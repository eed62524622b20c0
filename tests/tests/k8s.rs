//! The shipped Kubernetes manifests parse, and each has what its API
//! requires and what fanout needs of it: probes on the admin port's
//! endpoints, a grace period longer than the request deadline, resources,
//! selectors that match, and the image's user.

use anyhow::{Context, Result};
use serde_norway::Value;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifest(name: &str) -> Result<Value> {
    let path = root().join("deploy/k8s").join(name);
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let value: Value = serde_norway::from_str(&text).with_context(|| path.display().to_string())?;
    // What every Kubernetes object needs.
    for key in ["apiVersion", "kind", "metadata"] {
        assert!(value.get(key).is_some(), "{name}: no {key}");
    }
    assert!(
        value["metadata"]["name"].as_str().is_some(),
        "{name}: no name"
    );
    Ok(value)
}

fn labels_match(selector: &Value, labels: &Value) {
    let selector = selector.as_mapping().expect("a selector is a map");
    assert!(!selector.is_empty());
    for (key, value) in selector {
        assert_eq!(
            &labels[key], value,
            "selector {key:?} does not match the pods"
        );
    }
}

#[test]
fn every_shipped_manifest_is_a_kubernetes_object() -> Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s");
    let mut names: Vec<String> = std::fs::read_dir(&dir)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    names.sort();
    assert_eq!(
        names,
        [
            "configmap.yaml",
            "deployment.yaml",
            "hpa.yaml",
            "pdb.yaml",
            "service.yaml",
            "spinapp.yaml"
        ]
    );
    for name in &names {
        manifest(name)?;
    }
    Ok(())
}

#[test]
fn the_deployment_probes_drains_and_is_sized() -> Result<()> {
    let deployment = manifest("deployment.yaml")?;
    assert_eq!(deployment["kind"], "Deployment");
    assert_eq!(deployment["apiVersion"], "apps/v1");
    let template = &deployment["spec"]["template"];
    labels_match(
        &deployment["spec"]["selector"]["matchLabels"],
        &template["metadata"]["labels"],
    );
    let pod = &template["spec"];
    let container = &pod["containers"][0];
    assert!(container["image"].as_str().is_some());

    // Probes on the admin port, which the configuration listens on.
    let ports = container["ports"].as_sequence().context("ports")?;
    let admin = ports
        .iter()
        .find(|p| p["name"] == "admin")
        .context("an admin port")?;
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    let config = manifest("configmap.yaml")?;
    let toml_text = config["data"]["fanout.toml"]
        .as_str()
        .context("fanout.toml")?;
    let file: fanout_host::config::FileConfig = toml::from_str(toml_text)?;
    let admin_port = admin["containerPort"].as_u64().context("containerPort")?;
    assert_eq!(file.admin.map(|a| a.port() as u64), Some(admin_port));
    assert!(
        file.admin.is_some_and(|a| a.ip().is_unspecified()),
        "admin on all interfaces"
    );
    assert!(
        file.listen.is_some_and(|a| a.ip().is_unspecified()),
        "listen on all interfaces"
    );
    // The file is valid as the binary will read it.
    file.apply(fanout_tests::builder())?;

    // Requests in flight finish before the kill.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .context("grace")?;
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap_or(0);
    let deadline = file.limits()?.deadline.as_secs() + 1;
    assert!(grace > pre_stop + deadline, "grace {grace}s");

    // Sized: a CPU request (the HPA scales on it) and a memory limit.
    assert!(container["resources"]["requests"]["cpu"].as_str().is_some());
    assert!(
        container["resources"]["requests"]["memory"]
            .as_str()
            .is_some()
    );
    assert!(
        container["resources"]["limits"]["memory"]
            .as_str()
            .is_some()
    );

    // The pods run as the image's user, who owns its warmed cache (a
    // cache of another user's is refused, and the pod would compile at
    // every start on its read-only root).
    let containerfile = std::fs::read_to_string(root().join("deploy/image/Containerfile"))?;
    let image_user = containerfile
        .lines()
        .find_map(|line| line.strip_prefix("USER "))
        .and_then(|user| user.split(':').next())
        .context("the Containerfile sets no USER")?;
    let run_as = &container["securityContext"]["runAsUser"];
    assert_eq!(
        run_as.as_u64().map(|u| u.to_string()).as_deref(),
        Some(image_user)
    );
    assert!(
        containerfile.contains(&format!("--chown={image_user}:")),
        "the cache is not the image user's"
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    Ok(())
}

#[test]
fn service_hpa_and_budget_point_at_the_deployment() -> Result<()> {
    let deployment = manifest("deployment.yaml")?;
    let pods = &deployment["spec"]["template"]["metadata"]["labels"];
    let service = manifest("service.yaml")?;
    labels_match(&service["spec"]["selector"], pods);
    let ports = service["spec"]["ports"].as_sequence().context("ports")?;
    assert!(ports.iter().any(|p| p["targetPort"] == "http"));
    let hpa = manifest("hpa.yaml")?;
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    assert_eq!(hpa["spec"]["metrics"][0]["resource"]["name"], "cpu");
    assert!(
        hpa["spec"]["minReplicas"].as_u64() >= Some(2),
        "two replicas for the budget"
    );
    let pdb = manifest("pdb.yaml")?;
    assert_eq!(pdb["apiVersion"], "policy/v1");
    labels_match(&pdb["spec"]["selector"]["matchLabels"], pods);
    let spin = manifest("spinapp.yaml")?;
    assert_eq!(spin["kind"], "SpinApp");
    assert!(spin["spec"]["image"].as_str().is_some());
    assert_eq!(spin["spec"]["executor"], "containerd-shim-spin");
    Ok(())
}
