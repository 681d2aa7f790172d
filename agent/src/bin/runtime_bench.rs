//! `runtime-bench`: on-demand benchmark of the node runtime against `runc run` on the same
//! bundle, interleaved in one run; plus the memory of idle shims and of the agent holding 100
//! containers. Results go to BENCHMARKS.md. Needs root, /bin/busybox and runc.
//!
//! `cargo build --release -p gantry-agent && target/release/runtime-bench [--iterations 60]`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use gantry_agent::runtime::cgroups::Layout;
use gantry_agent::runtime::seccomp;
use gantry_agent::runtime::spec::DEFAULT_CAPABILITIES;
use gantry_agent::runtime::state::RuntimeKind;
use gantry_agent::runtime::{
    BuiltinRuntime, ContainerSpec, ContainerState, Runtime, RuntimeConfig,
};

#[derive(Parser, Debug)]
struct Opts {
    /// Measured iterations of each contender (after 5 warm-up runs each).
    #[arg(long, default_value_t = 60)]
    iterations: usize,
    /// The OCI runtime binary to compare with.
    #[arg(long, default_value = "/usr/sbin/runc")]
    runc: PathBuf,
    /// Idle containers for the memory measurement.
    #[arg(long, default_value_t = 100)]
    idle: usize,
    /// Also time the builtin runtime driven through runc (the OCI-binary option).
    #[arg(long)]
    with_oci_option: bool,
}

fn main() -> Result<()> {
    let opts = Opts::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(opts))
}

async fn run(opts: Opts) -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("gantry-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let result = bench(&opts, &tmp).await;
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

async fn bench(opts: &Opts, tmp: &Path) -> Result<()> {
    let rootfs = busybox_rootfs(tmp)?;
    let shim = std::env::current_exe()?
        .parent()
        .context("no exe dir")?
        .join("gantry-agent");
    if !shim.exists() {
        bail!("{shim:?} missing: build the gantry-agent binary first");
    }
    let proc_self = std::fs::read_to_string("/proc/self/cgroup")?;
    let own = Layout::discover(Path::new("/sys/fs/cgroup"), &proc_self, None)?
        .own()
        .to_path_buf();
    let parent = own.join(format!("gantry-bench-{}", std::process::id()));
    let config = RuntimeConfig::new(&tmp.join("state"), &shim, Some(&parent))?;
    let runtime = BuiltinRuntime::open(config.clone())?;
    let oci_runtime = if opts.with_oci_option {
        let mut c = config.clone();
        c.root = tmp.join("state-oci");
        c.runtime = RuntimeKind::Oci(opts.runc.clone());
        Some(BuiltinRuntime::open(c)?)
    } else {
        None
    };

    // One bundle for runc: the OCI config our runtime generates for the same spec, so both run
    // the same hardening (namespaces, seccomp, masked paths), only the engine differs.
    let probe = spec(&rootfs, "bundle-probe", &["/bin/true"]);
    runtime.create(probe).await?;
    let probe_dir = config.root.join("containers/bundle-probe");
    let config_json = std::fs::read_to_string(probe_dir.join("bundle/config.json"))?;
    let bundle = tmp.join("runc-bundle");
    std::fs::create_dir_all(&bundle)?;
    let mut cfg: serde_json::Value = serde_json::from_str(&config_json)?;
    cfg["linux"]["cgroupsPath"] = serde_json::json!(parent.join("runc-bench"));
    // The builtin runtime keeps the filter out of config.json (it installs a precompiled one);
    // runc gets the same filter in the bundle, encoded the way runc reads it.
    let caps: Vec<String> = DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect();
    let filter = seccomp::oci_seccomp(&seccomp::default_profile()?, &caps, std::env::consts::ARCH)?;
    cfg["linux"]["seccomp"] = serde_json::to_value(seccomp::spec_encoding(&filter)?)?;
    // The per-container /etc files of the probe stay valid for runc's runs.
    std::fs::write(bundle.join("config.json"), serde_json::to_vec(&cfg)?)?;
    let runc_root = tmp.join("runc-state");

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut via_oci = Vec::new();
    for i in 0..opts.iterations + 5 {
        let t = Instant::now();
        let id = format!("b{i}");
        runtime.create(spec(&rootfs, &id, &["/bin/true"])).await?;
        let t1 = t.elapsed();
        runtime.start(&id).await?;
        let t2 = t.elapsed();
        let exit = runtime.wait(&id).await?;
        let t3 = t.elapsed();
        runtime.delete(&id).await?;
        let d_ours = t.elapsed();
        if std::env::var_os("BENCH_PHASES").is_some() {
            eprintln!(
                "create {t1:?} start {:?} wait {:?} delete {:?}",
                t2 - t1,
                t3 - t2,
                d_ours - t3
            );
        }
        if exit.code != 0 {
            bail!("container exited {exit:?}");
        }

        let t = Instant::now();
        let status = std::process::Command::new(&opts.runc)
            .arg("--root")
            .arg(&runc_root)
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(format!("r{i}"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()?;
        let d_runc = t.elapsed();
        if !status.success() {
            bail!("runc run failed: {status}");
        }

        if let Some(oci) = &oci_runtime {
            let t = Instant::now();
            let id = format!("o{i}");
            oci.create(spec(&rootfs, &id, &["/bin/true"])).await?;
            oci.start(&id).await?;
            oci.wait(&id).await?;
            oci.delete(&id).await?;
            if i >= 5 {
                via_oci.push(t.elapsed());
            }
        }
        if i >= 5 {
            ours.push(d_ours);
            theirs.push(d_runc);
        }
    }
    runtime
        .stop("bundle-probe", "SIGKILL", Duration::ZERO)
        .await?;
    runtime.delete("bundle-probe").await?;

    let (o50, o95) = percentiles(&mut ours);
    let (r50, r95) = percentiles(&mut theirs);
    println!(
        "create+start+wait+delete of /bin/true, {} iterations each, interleaved",
        opts.iterations
    );
    println!("  gantry (builtin, libcontainer in the shim): p50 {o50:.1} ms  p95 {o95:.1} ms");
    println!("  runc run (same config.json):                 p50 {r50:.1} ms  p95 {r95:.1} ms");
    if !via_oci.is_empty() {
        let (v50, v95) = percentiles(&mut via_oci);
        println!("  gantry with --runtime runc:                  p50 {v50:.1} ms  p95 {v95:.1} ms");
    }
    println!("  ratio p50 gantry/runc: {:.2}", o50 / r50);

    // Memory: idle shims and the agent holding them.
    let rss_before = rss_kib(std::process::id() as i32)?;
    let mut shims = Vec::new();
    for i in 0..opts.idle {
        let id = format!("idle{i}");
        runtime
            .create(spec(&rootfs, &id, &["sleep", "3600"]))
            .await?;
        runtime.start(&id).await?;
        shims.push(id);
    }
    let mut pss = Vec::new();
    for id in &shims {
        let rec: gantry_agent::runtime::state::ProcessRecord = serde_json::from_slice(
            &std::fs::read(config.root.join("containers").join(id).join("process.json"))?,
        )?;
        pss.push(pss_kib(rec.shim.pid)?);
        let state = runtime.state(id).await?.state;
        if !matches!(state, ContainerState::Running { .. }) {
            bail!("{id} not running: {state:?}");
        }
    }
    let rss_after = rss_kib(std::process::id() as i32)?;
    let total_pss: u64 = pss.iter().sum();
    pss.sort_unstable();
    println!(
        "{} idle containers: shim PSS median {} KiB ({:.2} MiB), total {:.1} MiB",
        opts.idle,
        pss[pss.len() / 2],
        pss[pss.len() / 2] as f64 / 1024.0,
        total_pss as f64 / 1024.0
    );
    println!(
        "agent (this process) RSS: {:.1} MiB before, {:.1} MiB with {} containers",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        opts.idle
    );
    for id in &shims {
        runtime.stop(id, "SIGKILL", Duration::ZERO).await?;
        runtime.delete(id).await?;
    }
    runtime.release_cgroups()?;
    Ok(())
}

fn spec(rootfs: &Path, id: &str, args: &[&str]) -> ContainerSpec {
    ContainerSpec::new(id, rootfs, args.iter().copied())
}

fn percentiles(v: &mut [Duration]) -> (f64, f64) {
    v.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (
        ms(v[v.len() / 2]),
        ms(v[(v.len() * 95 / 100).min(v.len() - 1)]),
    )
}

fn busybox_rootfs(dir: &Path) -> Result<PathBuf> {
    let rootfs = dir.join("rootfs");
    for d in ["bin", "etc", "proc", "dev", "sys", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).context("copying /bin/busybox")?;
    for applet in ["sh", "true", "sleep"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    Ok(rootfs)
}

fn field_kib(path: &str, key: &str) -> Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("{key} in {path}"))
}

fn pss_kib(pid: i32) -> Result<u64> {
    field_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:")
}

fn rss_kib(pid: i32) -> Result<u64> {
    field_kib(&format!("/proc/{pid}/status"), "VmRSS:")
}
