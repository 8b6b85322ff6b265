//! The docker-compose stack and the Trino catalogs are wired together: Docker and Trino cannot
//! run here, so the files are read and every connection between them is checked: hosts,
//! ports, the bucket, credential variables, health checks and start order.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::repo;
use serde_norway::Value;
use sluice::config::Config;

fn compose() -> Value {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let mut value: Value = serde_norway::from_str(&text).unwrap();
    value.apply_merge().unwrap();
    value
}

fn services(compose: &Value) -> BTreeMap<String, Value> {
    compose["services"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(name, service)| (name.as_str().unwrap().to_string(), service.clone()))
        .collect()
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn env(service: &Value) -> BTreeMap<String, String> {
    service["environment"]
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.as_str().unwrap().to_string(), text(v)))
                .collect()
        })
        .unwrap_or_default()
}

/// The words of a service's command, whether written as a list or a string.
fn command(service: &Value) -> Vec<String> {
    match &service["command"] {
        Value::Sequence(words) => words.iter().map(text).collect(),
        Value::String(line) => line.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

/// `host path -> container path` of the service's bind mounts.
fn mounts(service: &Value) -> BTreeMap<String, String> {
    service["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let spec = v.as_str().unwrap();
            let mut parts = spec.split(':');
            let host = parts.next().unwrap();
            let container = parts.next().unwrap();
            host.starts_with("./")
                .then(|| (host.to_string(), container.to_string()))
        })
        .collect()
}

/// The variable a `${NAME}`, `${NAME:?message}` or `${NAME:-default}` value reads.
fn variable(value: &str) -> &str {
    let inner = value
        .strip_prefix("${")
        .unwrap_or_else(|| panic!("{value} is not a ${{VARIABLE}}"));
    inner.split([':', '}']).next().unwrap()
}

fn one_shot(service: &Value) -> bool {
    service["restart"].as_str() == Some("no")
}

/// `key -> value` of a Java properties file (Trino catalogs).
fn properties(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

/// The writer's config in the compose stack, as the image has it.
fn writer_config(services: &BTreeMap<String, Value>) -> Config {
    let words = command(&services["sluice"]);
    let at = words.iter().position(|w| w == "--config").unwrap();
    let in_image = &words[at + 1];
    let relative = in_image
        .strip_prefix("/etc/sluice/")
        .expect("the config comes from the image's /etc/sluice");
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let folder = relative.split('/').next().unwrap();
    assert!(
        dockerfile.contains(&format!("COPY {folder} /etc/sluice/{folder}")),
        "the Dockerfile copies {folder}/ to /etc/sluice/{folder}"
    );
    Config::load(&repo().join(relative), std::iter::empty()).unwrap()
}

fn host_port(url: &str) -> (String, u16) {
    let url = url::Url::parse(url).unwrap();
    (
        url.host_str().unwrap().to_string(),
        url.port_or_known_default().unwrap(),
    )
}

#[test]
fn every_service_is_health_checked_and_starts_after_what_it_needs() {
    let compose = compose();
    let services = services(&compose);
    for (name, service) in &services {
        assert!(
            service["healthcheck"]["test"].is_sequence() || one_shot(service),
            "{name} has no health check (only one-shot jobs, restart \"no\", may go without)"
        );
        let Some(needs) = service["depends_on"].as_mapping() else {
            continue;
        };
        for (needed, how) in needs {
            let needed = needed.as_str().unwrap();
            let target = services
                .get(needed)
                .unwrap_or_else(|| panic!("{name} depends on unknown service {needed}"));
            match how["condition"].as_str() {
                Some("service_healthy") => assert!(
                    target["healthcheck"]["test"].is_sequence(),
                    "{name} waits for {needed} to be healthy, which has no health check"
                ),
                Some("service_completed_successfully") => assert!(
                    one_shot(target),
                    "{name} waits for {needed} to finish, which is not a one-shot job"
                ),
                Some("service_started") => {}
                other => panic!("{name} -> {needed}: condition {other:?}"),
            }
            let both_in_default = service["profiles"].is_null() && target["profiles"].is_null();
            assert!(
                both_in_default || !service["profiles"].is_null(),
                "{name} (always started) depends on {needed}, which only a profile starts"
            );
        }
    }
    for job in services
        .iter()
        .filter(|(_, s)| one_shot(s) && s["healthcheck"].is_null())
    {
        assert!(
            services.values().any(|s| {
                s["depends_on"][job.0.as_str()]["condition"].as_str()
                    == Some("service_completed_successfully")
            }),
            "the job {} is awaited by some service",
            job.0
        );
    }
    for name in [
        "kafka",
        "minio",
        "metastore-db",
        "hive-metastore",
        "trino",
        "sluice",
        "producer",
    ] {
        assert!(services.contains_key(name), "the stack has {name}");
    }
}

#[test]
fn images_are_pinned_and_minio_comes_from_a_registry_that_still_serves_it() {
    let services = services(&compose());
    for (name, service) in &services {
        let image = service["image"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} names its image"));
        if !service["build"].is_null() {
            let context = repo().join(service["build"].as_str().unwrap());
            assert!(
                context.join("Dockerfile").is_file(),
                "{name}: {}",
                context.display()
            );
            continue;
        }
        let (_, tag) = image
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{name}: {image} has no tag"));
        assert!(
            tag != "latest" && !tag.contains('/'),
            "{name}: {image} is not pinned"
        );
        if image.contains("minio") {
            assert!(
                image.starts_with("quay.io/minio/"),
                "{name}: {image} is not pullable"
            );
        }
    }
    let hive = std::fs::read_to_string(repo().join("deploy/hive/Dockerfile")).unwrap();
    assert!(hive.contains("FROM apache/hive:4."), "Hive Metastore 4.x");
    assert!(hive.contains("postgresql-"), "with the PostgreSQL driver");
}

#[test]
fn the_writer_reaches_kafka_and_minio_and_writes_the_bucket_the_stack_creates() {
    let services = services(&compose());
    let config = writer_config(&services);

    let kafka = env(&services["kafka"]);
    let advertised = &kafka["KAFKA_ADVERTISED_LISTENERS"];
    let internal = kafka["KAFKA_INTER_BROKER_LISTENER_NAME"].clone();
    assert!(
        advertised.contains(&format!("{internal}://{}", config.kafka.brokers)),
        "kafka.brokers {} is the broker's advertised {internal} listener ({advertised})",
        config.kafka.brokers
    );
    let producer = command(&services["producer"]);
    let at = producer.iter().position(|w| w == "--brokers").unwrap();
    assert_eq!(
        producer[at + 1],
        config.kafka.brokers,
        "the producer feeds the same broker"
    );
    assert!(
        producer.contains(&"--partitions".to_string()),
        "the producer creates the topics"
    );
    assert_eq!(
        kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"], "false",
        "topics come from --partitions, not from typos"
    );

    let endpoint = config.storage.s3.endpoint.clone().unwrap();
    let (host, port) = host_port(&endpoint);
    assert!(
        services.contains_key(&host),
        "storage.s3.endpoint names the {host} service"
    );
    assert_eq!(port, 9000, "MinIO serves S3 on 9000");
    assert!(command(&services[&host]).contains(&"server".to_string()));
    assert!(
        !config.storage.s3.virtual_hosted_style,
        "MinIO wants path-style requests"
    );

    let bucket = config
        .storage
        .root
        .strip_prefix("s3://")
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let creates = command(&services["minio-buckets"]).join(" ");
    assert!(
        creates.contains(&format!("mc mb --ignore-existing lake/{bucket}")),
        "the bucket job creates {bucket}: {creates}"
    );

    let listen = config.metrics.listen.clone().unwrap();
    let metrics_port = listen.rsplit(':').next().unwrap();
    let health = services["sluice"]["healthcheck"]["test"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(text)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        health.contains(&format!("localhost:{metrics_port}/readyz")),
        "{health}"
    );
    let prometheus =
        std::fs::read_to_string(repo().join("deploy/prometheus/prometheus.yml")).unwrap();
    assert!(
        prometheus.contains(&format!("\"sluice:{metrics_port}\"")),
        "Prometheus scrapes sluice"
    );
}

#[test]
fn secrets_come_from_the_environment_and_every_user_of_minio_gets_the_same_ones() {
    let services = services(&compose());
    for (name, service) in &services {
        for (key, value) in env(service) {
            if ["PASSWORD", "SECRET", "ACCESS_KEY"]
                .iter()
                .any(|s| key.contains(s))
            {
                assert!(
                    value.starts_with("${") && value.ends_with('}'),
                    "{name}: {key} holds a literal value instead of a variable from .env"
                );
            }
        }
        for word in command(service) {
            assert!(
                !word.contains("Password="),
                "{name}: a password on a command line"
            );
        }
    }
    let minio = env(&services["minio"]);
    assert_eq!(variable(&minio["MINIO_ROOT_USER"]), "MINIO_ROOT_USER");
    assert_eq!(
        variable(&minio["MINIO_ROOT_PASSWORD"]),
        "MINIO_ROOT_PASSWORD"
    );
    for name in [
        "sluice",
        "hive-metastore",
        "trino",
        "trino-file-metastore",
        "minio-buckets",
    ] {
        let env = env(&services[name]);
        assert_eq!(
            variable(&env["AWS_ACCESS_KEY_ID"]),
            "MINIO_ROOT_USER",
            "{name}"
        );
        assert_eq!(
            variable(&env["AWS_SECRET_ACCESS_KEY"]),
            "MINIO_ROOT_PASSWORD",
            "{name}"
        );
    }
    let example = std::fs::read_to_string(repo().join(".env.example")).unwrap();
    for variable in [
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
        "POSTGRES_PASSWORD",
    ] {
        assert!(
            example.contains(&format!("\n{variable}=")),
            ".env.example lists {variable}"
        );
    }
    for line in example
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("PASSWORD="))
    {
        assert!(
            line.ends_with('='),
            ".env.example holds no password: {line}"
        );
    }
    let ignored = std::fs::read_to_string(repo().join(".gitignore")).unwrap();
    assert!(ignored.lines().any(|l| l == "/.env"), ".env is git-ignored");
}

#[test]
fn the_trino_catalogs_reach_the_store_and_metastore_with_current_property_names() {
    let services = services(&compose());
    let config = writer_config(&services);
    let endpoint = config.storage.s3.endpoint.clone().unwrap();
    let bucket_root = format!(
        "s3://{}/",
        config
            .storage
            .root
            .strip_prefix("s3://")
            .unwrap()
            .split('/')
            .next()
            .unwrap()
    );
    for name in ["trino", "trino-file-metastore"] {
        let trino = &services[name];
        let image = trino["image"].as_str().unwrap();
        let version: u32 = image.rsplit_once(':').unwrap().1.parse().unwrap();
        assert!(
            (440..500).contains(&version),
            "{name}: a recent Trino 4xx, not {image}"
        );
        let mounts = mounts(trino);
        let (folder, _) = mounts
            .iter()
            .find(|(_, container)| *container == "/etc/trino/catalog")
            .unwrap_or_else(|| panic!("{name} mounts a catalog folder"));
        let catalog = properties(&repo().join(folder).join("delta.properties"));
        let env = env(trino);
        // Endpoints come from the server's environment (`${ENV:NAME}`), as in the Trino suite.
        let resolved = |key: &str| -> String {
            let value = &catalog[key];
            match value
                .strip_prefix("${ENV:")
                .and_then(|rest| rest.strip_suffix('}'))
            {
                Some(variable) => env
                    .get(variable)
                    .unwrap_or_else(|| panic!("{name} sets {variable} for {key}"))
                    .clone(),
                None => value.clone(),
            }
        };

        assert_eq!(catalog["connector.name"], "delta_lake", "{folder}");
        for key in catalog.keys() {
            assert!(
                !key.starts_with("hive.s3."),
                "{folder}: legacy property {key}"
            );
        }
        // Trino 481 removed the legacy file systems and renamed fs.native-s3.enabled.
        let switch = if version >= 481 {
            "fs.s3.enabled"
        } else {
            "fs.native-s3.enabled"
        };
        assert_eq!(
            catalog.get(switch).map(String::as_str),
            Some("true"),
            "{folder}: {switch}"
        );
        assert!(
            !catalog.contains_key("fs.native-s3.enabled") || version < 481,
            "{folder}: fs.native-s3.enabled is gone in Trino {version}"
        );
        assert_eq!(
            resolved("s3.endpoint"),
            endpoint,
            "{folder}: same store as the writer"
        );
        assert_eq!(
            Some(&catalog["s3.region"]),
            config.storage.s3.region.as_ref(),
            "{folder}"
        );
        assert_eq!(
            catalog["s3.path-style-access"],
            (!config.storage.s3.virtual_hosted_style).to_string(),
            "{folder}"
        );
        for (key, variable) in [
            ("s3.aws-access-key", "AWS_ACCESS_KEY_ID"),
            ("s3.aws-secret-key", "AWS_SECRET_ACCESS_KEY"),
        ] {
            assert_eq!(
                catalog[key],
                format!("${{ENV:{variable}}}"),
                "{folder}: {key}"
            );
            assert!(
                env.contains_key(variable),
                "{name} sets {variable} for its catalog"
            );
        }
        assert_eq!(
            catalog["delta.register-table-procedure.enabled"], "true",
            "{folder}"
        );

        match catalog.get("hive.metastore").map(String::as_str) {
            Some("file") => {
                let dir = &catalog["hive.metastore.catalog.dir"];
                assert!(
                    dir.starts_with(&bucket_root),
                    "{folder}: {dir} in the bucket"
                );
            }
            None | Some("thrift") => {
                let uri = &resolved("hive.metastore.uri");
                let (host, port) = host_port(uri);
                assert!(services.contains_key(&host), "{folder}: {uri} is a service");
                assert_eq!(port, 9083);
                assert_eq!(
                    trino["depends_on"][host.as_str()]["condition"].as_str(),
                    Some("service_healthy"),
                    "{name} starts once the metastore is healthy"
                );
            }
            Some(other) => panic!("{folder}: metastore {other}"),
        }
        assert!(
            mounts
                .iter()
                .any(|(host, c)| host == "./sql" && c == "/sql")
        );
    }
}

#[test]
fn the_metastore_reaches_postgres_and_minio() {
    let services = services(&compose());
    let config = writer_config(&services);
    let hive = &services["hive-metastore"];
    let env = env(hive);
    let postgres = self::env(&services["metastore-db"]);
    let options = &env["SERVICE_OPTS"];
    assert!(options.contains(&format!(
        "jdbc:postgresql://metastore-db:5432/{}",
        postgres["POSTGRES_DB"]
    )));
    assert!(options.contains(&format!("ConnectionUserName={}", postgres["POSTGRES_USER"])));
    assert!(options.contains(&format!(
        "ConnectionPassword=${{{}}}",
        variable(&postgres["POSTGRES_PASSWORD"])
    )));
    assert_eq!(env["DB_DRIVER"], "postgres");
    for jar in env["HIVE_AUX_JARS_PATH"].split(':') {
        assert!(
            jar.contains("hadoop-aws") || jar.contains("aws-java-sdk-bundle"),
            "{jar}"
        );
    }

    let mounts = mounts(hive);
    let (site, _) = mounts
        .iter()
        .find(|(_, c)| c.as_str() == "/opt/hive/conf/metastore-site.xml")
        .expect("metastore-site.xml is mounted");
    let site = std::fs::read_to_string(repo().join(site)).unwrap();
    let property = |name: &str| -> String {
        let at = site
            .find(&format!("<name>{name}</name>"))
            .unwrap_or_else(|| panic!("metastore-site.xml sets {name}"));
        let rest = &site[at..];
        let start = rest.find("<value>").unwrap() + "<value>".len();
        let end = rest.find("</value>").unwrap();
        rest[start..end].to_string()
    };
    // The endpoint comes from the metastore's environment (Hadoop's `${env.NAME}`), as in the
    // Trino suite (scripts/metastore.sh).
    assert_eq!(property("fs.s3a.endpoint"), "${env.S3_ENDPOINT}");
    assert_eq!(
        Some(&env["S3_ENDPOINT"]),
        config.storage.s3.endpoint.as_ref()
    );
    assert_eq!(property("fs.s3a.path.style.access"), "true");
    assert_eq!(
        property("fs.s3.impl"),
        "org.apache.hadoop.fs.s3a.S3AFileSystem",
        "s3:// locations, as sluice and Trino write them"
    );
    assert!(property("fs.s3a.aws.credentials.provider").contains("EnvironmentVariable"));
}

#[test]
fn every_file_the_stack_mounts_exists() {
    let services = services(&compose());
    for (name, service) in &services {
        for host in mounts(service).keys() {
            assert!(
                repo().join(host).exists(),
                "{name} mounts {host}, which is missing"
            );
        }
    }
}

/// Stateful services keep their data in the named volume they mount: for Kafka that takes
/// `KAFKA_LOG_DIRS` (the image's default is under /tmp), or recreating the container loses
/// the topics while the table keeps their committed positions.
#[test]
fn kafka_keeps_its_topics_in_its_volume() {
    let services = services(&compose());
    let kafka = &services["kafka"];
    let volumes: Vec<(String, String)> = kafka["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let (volume, path) = v.as_str()?.split_once(':')?;
            (!volume.starts_with("./")).then(|| (volume.to_string(), path.to_string()))
        })
        .collect();
    let log_dirs = env(kafka)
        .get("KAFKA_LOG_DIRS")
        .cloned()
        .expect("kafka sets KAFKA_LOG_DIRS");
    assert!(
        volumes.iter().any(|(_, path)| *path == log_dirs),
        "KAFKA_LOG_DIRS {log_dirs} is a mounted volume: {volumes:?}"
    );
}
