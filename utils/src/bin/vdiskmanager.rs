//! `vdiskmanager`: create, inspect, convert, grow, shrink, defragment, check and
//! repair virtual disks.
//!
//! Accepts vmware-vdiskmanager's syntax (`vdiskmanager -c -s 64MB -a lsilogic -t 0
//! disk.vmdk`, `-r`, `-n`, `-x`, `-k`, `-d`, `-e`, `-R`) and subcommands (`info`,
//! `convert`, `map`, `meta`, `unlink`, `snapshot`, `commit`, `cbt`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use vdisk::{
    convert, create, AdapterType, ConvertOptions, CreateOptions, Disk, DiskType, ImageFormat,
    OpenOptions, RangeKind, VirtualDisk,
};
use vdisk_utils::{
    human_bytes, parse_size, print_json, print_walk, progress_bar, step_bar, JsonWalk,
};

/// vmware-vdiskmanager style invocation (one operation per call).
#[derive(Parser, Debug)]
#[command(
    name = "vdiskmanager",
    about = "Create, inspect, convert, grow, shrink, defragment, check and repair VMware virtual disks",
    after_help = "Subcommands: info [--json] DISK | convert -f FMT -O FMT [-t N] SRC DST | map [--json] DISK | meta list|get KEY|set KEY VALUE DISK | snapshot [-t TYPE] PARENT [CHILD] | commit [--keep-child] [--links N] CHILD | unlink DISK\n\
                  Disk types (-t): 0 monolithicSparse, 1 twoGbMaxExtentSparse, 2 monolithicFlat, 3 twoGbMaxExtentFlat, 4 vmfs, 5 streamOptimized, 6 vmfsThin"
)]
struct VmwareArgs {
    /// Create a disk (needs -s and -t; -a optional).
    #[arg(short = 'c')]
    create: bool,
    /// Rename SOURCE (descriptor and extent files) to the disk named last.
    #[arg(short = 'n', value_name = "SOURCE")]
    rename_from: Option<PathBuf>,
    /// Convert/copy SOURCE into the disk named last, of type -t.
    #[arg(short = 'r', value_name = "SOURCE")]
    convert_from: Option<PathBuf>,
    /// Grow the disk to SIZE (not smaller than it is).
    #[arg(short = 'x', value_name = "SIZE")]
    grow_to: Option<String>,
    /// Shrink the disk: reclaim zeroed grains and unused space (growable disks).
    #[arg(short = 'k')]
    shrink: bool,
    /// Defragment the disk: store its grains in guest order (growable disks).
    #[arg(short = 'd')]
    defragment: bool,
    /// Check the disk's metadata for consistency.
    #[arg(short = 'e')]
    check: bool,
    /// Check the disk and repair what can be repaired.
    #[arg(short = 'R')]
    repair: bool,
    /// Capacity: a number with KB, MB, GB or TB, or a count of sectors.
    #[arg(short = 's', value_name = "SIZE")]
    size: Option<String>,
    /// Adapter type: ide, buslogic, lsilogic, lsisas, pvscsi, legacyESX.
    #[arg(short = 'a', value_name = "ADAPTER", default_value = "lsilogic")]
    adapter: String,
    /// Disk type number (0-6).
    #[arg(short = 't', value_name = "TYPE")]
    disk_type: Option<String>,
    /// Virtual hardware version to record (`ddb.virtualHWVersion`).
    #[arg(long = "hwversion", value_name = "N", default_value_t = vdisk::ops::create::DEFAULT_HW_VERSION)]
    hw_version: u32,
    /// Do not print messages.
    #[arg(short = 'q')]
    quiet: bool,
    /// The disk.
    disk: Option<PathBuf>,
}

#[derive(Parser, Debug)]
#[command(name = "vdiskmanager")]
struct SubArgs {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Raw,
    Vmdk,
}

impl From<Format> for ImageFormat {
    fn from(f: Format) -> ImageFormat {
        match f {
            Format::Raw => ImageFormat::Raw,
            Format::Vmdk => ImageFormat::Vmdk,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show capacity, type, geometry, adapter, CIDs, extents and allocation.
    Info {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The disk, or an NBD export (nbd://HOST[:PORT]/EXPORT, nbds://...,
        /// nbd+unix:///EXPORT?socket=PATH; TLS settings from VDISK_NBD_TLS_*).
        disk: PathBuf,
    },
    /// Convert between raw images and VMDK disks (the source may be an NBD URI).
    Convert {
        /// Source format.
        #[arg(short = 'f', value_enum, default_value = "vmdk")]
        from: Format,
        /// Destination format.
        #[arg(short = 'O', value_enum, default_value = "vmdk")]
        to: Format,
        /// Destination disk type (0-6 or a type name) when writing VMDK.
        #[arg(short = 't', default_value = "0")]
        disk_type: String,
        /// Adapter type of a VMDK destination.
        #[arg(short = 'a', default_value = "lsilogic")]
        adapter: String,
        /// Do not show progress.
        #[arg(short = 'q')]
        quiet: bool,
        /// zlib level (0-9) for streamOptimized destinations.
        #[arg(long, default_value_t = vdisk::ops::convert::DEFAULT_COMPRESSION_LEVEL, value_parser = clap::value_parser!(u32).range(0..=9))]
        level: u32,
        /// fsync the destination before exiting (like qemu-img, the default leaves
        /// the written data to the host's normal write-back).
        #[arg(long)]
        sync: bool,
        /// Source: a disk, a raw image, or an NBD export (URI).
        src: PathBuf,
        /// Destination (must not exist).
        dst: PathBuf,
    },
    /// Show which ranges hold data, zeros or nothing.
    Map {
        /// Print JSON (like `qemu-img map --output=json`).
        #[arg(long)]
        json: bool,
        /// The disk, or an NBD export (URI).
        disk: PathBuf,
    },
    /// Create a child (snapshot delta) of a disk; the parent becomes read-only by convention.
    Snapshot {
        /// Child type: monolithicSparse, twoGbMaxExtentSparse, vmfsSparse or seSparse
        /// (default: what suits the parent).
        #[arg(short = 't')]
        disk_type: Option<String>,
        /// Do not print messages.
        #[arg(short = 'q')]
        quiet: bool,
        /// The parent disk.
        parent: PathBuf,
        /// The new child (default: VMware's next name, `disk-000001.vmdk`).
        child: Option<PathBuf>,
    },
    /// Merge a child (snapshot delta) into its parent and remove it.
    Commit {
        /// Keep the child (re-pointed at the updated parent) instead of deleting it.
        #[arg(long)]
        keep_child: bool,
        /// Number of links from the top to merge into the link below them.
        #[arg(long, default_value_t = 1)]
        links: usize,
        /// Do not show progress or messages.
        #[arg(short = 'q')]
        quiet: bool,
        /// The child (top of the chain).
        child: PathBuf,
    },
    /// Delete a disk: its descriptor and every extent file.
    Unlink {
        /// The disk.
        disk: PathBuf,
    },
    /// Changed-block tracking: enable, disable, show, and list what changed.
    Cbt {
        #[command(subcommand)]
        action: CbtAction,
    },
    /// List, read or write disk database (DDB) entries.
    Meta {
        #[command(subcommand)]
        action: MetaAction,
    },
}

#[derive(Subcommand, Debug)]
enum CbtAction {
    /// Turn tracking on (prints the first change ID; already on: the current one).
    Enable {
        /// The disk (its top link is tracked).
        disk: PathBuf,
    },
    /// Turn tracking off and delete the tracking file.
    Disable {
        /// The disk.
        disk: PathBuf,
    },
    /// Show whether tracking is on, trusted, and the current change ID.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The disk.
        disk: PathBuf,
    },
    /// List the areas changed since a change ID (`*`, the default: all allocated data).
    Changes {
        /// The change ID a previous backup recorded.
        #[arg(long, default_value = "*")]
        since: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The disk.
        disk: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum MetaAction {
    /// List every key and value.
    List {
        /// The disk.
        disk: PathBuf,
    },
    /// Print one value.
    Get {
        /// Key (with or without `ddb.`).
        key: String,
        /// The disk.
        disk: PathBuf,
    },
    /// Set one value.
    Set {
        /// Key (with or without `ddb.`).
        key: String,
        /// Value.
        value: String,
        /// The disk.
        disk: PathBuf,
    },
}

type CliResult = Result<(), String>;

/// `println!` that exits quietly when stdout is closed (`vdiskmanager map | head`)
/// instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            return Err(format!("cannot write output: {e}"));
        }
    }};
}

fn err(e: vdisk::Error) -> String {
    e.to_string()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let is_sub = args.get(1).is_some_and(|a| {
        matches!(
            a.as_str(),
            "info" | "convert" | "map" | "meta" | "unlink" | "snapshot" | "commit" | "cbt" | "help"
        )
    });
    let result = if is_sub {
        SubArgs::try_parse_from(&args)
            .map_err(usage_error)
            .and_then(|a| run_sub(a.command))
    } else {
        VmwareArgs::try_parse_from(&args)
            .map_err(usage_error)
            .and_then(run_vmware)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("vdiskmanager: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version requests print and exit; argument errors become one line.
fn usage_error(e: clap::Error) -> String {
    use clap::error::ErrorKind as K;
    if matches!(
        e.kind(),
        K::DisplayHelp | K::DisplayVersion | K::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    let message: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
        .collect();
    format!(
        "{} (see --help)",
        message.join(" ").trim_start_matches("error: ")
    )
}

fn run_vmware(a: VmwareArgs) -> CliResult {
    let operations = [
        a.create,
        a.rename_from.is_some(),
        a.convert_from.is_some(),
        a.grow_to.is_some(),
        a.shrink,
        a.defragment,
        a.check,
        a.repair,
    ];
    if operations.iter().filter(|&&o| o).count() > 1 {
        return Err("give one operation per call (one of -c, -n, -r, -x, -k, -d, -e, -R)".into());
    }
    if a.grow_to.is_some() || a.shrink || a.defragment || a.check || a.repair {
        return maintain(&a);
    }
    if let Some(src) = &a.rename_from {
        let dst = a.disk.as_ref().ok_or("-n needs a new disk name")?;
        vdisk::ops::files::rename(src, dst).map_err(err)?;
        if !a.quiet {
            outln!("Renamed {} to {}", src.display(), dst.display());
        }
        return Ok(());
    }
    if let Some(src) = &a.convert_from {
        if a.create {
            return Err("-c and -r cannot be used together".into());
        }
        let dst = a.disk.as_ref().ok_or("-r needs a destination disk")?;
        let disk_type: DiskType = a.disk_type.as_deref().unwrap_or("0").parse().map_err(err)?;
        let adapter: AdapterType = a.adapter.parse().map_err(err)?;
        return convert_cmd(
            src,
            ImageFormat::Vmdk,
            dst,
            ImageFormat::Vmdk,
            ConvertOptions {
                target: CreateOptions {
                    disk_type,
                    capacity: 0,
                    adapter,
                    hw_version: a.hw_version,
                },
                sync: false,
                compression_level: vdisk::ops::convert::DEFAULT_COMPRESSION_LEVEL,
            },
            a.quiet,
        );
    }
    if !a.create {
        return Err("no operation given (use -c to create, -r to convert, -x/-k/-d to grow, shrink or defragment, -e/-R to check or repair, or a subcommand: info, convert, map, meta, unlink, snapshot, commit, cbt; see --help)".into());
    }
    let disk = a.disk.ok_or("-c needs a disk file name")?;
    let size = parse_size(a.size.as_deref().ok_or("-c needs a capacity (-s SIZE)")?)?;
    let disk_type: DiskType = a
        .disk_type
        .as_deref()
        .ok_or("-c needs a disk type (-t 0..6)")?
        .parse()
        .map_err(err)?;
    let adapter: AdapterType = a.adapter.parse().map_err(err)?;
    let opts = CreateOptions {
        disk_type,
        capacity: size,
        adapter,
        hw_version: a.hw_version,
    };
    create(&disk, &opts).map_err(err)?;
    if let Some(w) = disk_type.capacity_warning(size) {
        eprintln!("vdiskmanager: warning: {w}");
    }
    if !a.quiet {
        outln!(
            "Virtual disk creation successful: {} ({disk_type}, {})",
            disk.display(),
            human_bytes(size)
        );
    }
    Ok(())
}

/// Grow, shrink, defragment, check and repair (vmware-vdiskmanager -x, -k, -d, -e, -R).
fn maintain(a: &VmwareArgs) -> CliResult {
    let disk = a.disk.as_deref().ok_or("the operation needs a disk")?;
    let name = disk.display();
    let bar = step_bar(a.quiet, "working");
    let mut progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
        true
    };
    if let Some(size) = &a.grow_to {
        let size = parse_size(size)?;
        let opts = vdisk::ops::grow::GrowOptions::default();
        vdisk::ops::grow::grow(disk, size, &opts, &mut progress).map_err(err)?;
        bar.finish_and_clear();
        if !a.quiet {
            outln!("Grew {name} to {}", human_bytes(size));
        }
        return Ok(());
    }
    if a.shrink {
        let st = vdisk::ops::shrink::shrink(disk, &mut progress).map_err(err)?;
        bar.finish_and_clear();
        if !a.quiet {
            outln!(
                "Shrink completed: {name}: {} -> {} ({} zeroed grains reclaimed, {} pieces moved)",
                human_bytes(st.bytes_before),
                human_bytes(st.bytes_after),
                st.zero_grains,
                st.moved
            );
        }
        return Ok(());
    }
    if a.defragment {
        let st = vdisk::ops::defrag::defragment(disk, &mut progress).map_err(err)?;
        bar.finish_and_clear();
        if !a.quiet {
            outln!(
                "Defragmentation completed: {name}: {} fragments -> {}",
                st.fragments_before,
                st.fragments_after
            );
        }
        return Ok(());
    }
    drop(bar);
    let report = vdisk::ops::check::check(disk, a.repair).map_err(err)?;
    for f in &report.findings {
        let what = match (&f.repair, a.repair) {
            (Some(r), true) => format!("repaired: {r}"),
            (Some(r), false) => format!("repair would {r}"),
            (None, _) => "cannot be repaired".to_string(),
        };
        outln!("{}: {} ({what})", f.file.display(), f.problem);
    }
    if report.unlisted > 0 {
        outln!(
            "... and {} more not listed ({} of them cannot be repaired)",
            problems(report.unlisted as usize),
            report.unlisted_unrepairable
        );
    }
    if report.is_clean() {
        if !a.quiet {
            outln!("The virtual disk, '{name}', is correctly configured.");
        }
        return Ok(());
    }
    match (a.repair, report.unrepaired()) {
        (true, 0) => {
            if !a.quiet {
                outln!("The virtual disk, '{name}', was repaired.");
            }
            Ok(())
        }
        (true, n) => Err(format!("{name}: {} could not be repaired", problems(n))),
        (false, n) if report.all_repairable() => Err(format!(
            "{name}: {} found; repair with vdiskmanager -R {name}",
            problems(n)
        )),
        (false, n) => Err(format!(
            "{name}: {} found, not all of which can be repaired",
            problems(n)
        )),
    }
}

fn problems(n: usize) -> String {
    if n == 1 {
        "1 problem".to_string()
    } else {
        format!("{n} problems")
    }
}

fn run_sub(c: Command) -> CliResult {
    match c {
        Command::Info { json, disk } => info(&disk, json),
        Command::Convert {
            from,
            to,
            disk_type,
            adapter,
            quiet,
            level,
            sync,
            src,
            dst,
        } => {
            let disk_type: DiskType = disk_type.parse().map_err(err)?;
            let adapter: AdapterType = adapter.parse().map_err(err)?;
            let opts = ConvertOptions {
                target: CreateOptions {
                    disk_type,
                    capacity: 0,
                    adapter,
                    hw_version: vdisk::ops::create::DEFAULT_HW_VERSION,
                },
                sync,
                compression_level: level,
            };
            convert_cmd(&src, from.into(), &dst, to.into(), opts, quiet)
        }
        Command::Map { json, disk } => map(&disk, json),
        Command::Unlink { disk } => vdisk::ops::files::unlink(&disk).map_err(err),
        Command::Commit {
            keep_child,
            links,
            quiet,
            child,
        } => {
            let bar = progress_bar(0, quiet, "committing");
            let mut progress = |done: u64, total: u64| {
                bar.set_length(total);
                bar.set_position(done);
                true
            };
            let opts = vdisk::ops::commit::CommitOptions { links, keep_child };
            let st = vdisk::ops::commit::commit(&child, &opts, &mut progress).map_err(err)?;
            bar.finish_and_clear();
            if !quiet {
                outln!(
                    "Committed {} into {} ({} written, new CID {:08x})",
                    child.display(),
                    st.target.display(),
                    human_bytes(st.bytes),
                    st.cid
                );
            }
            Ok(())
        }
        Command::Snapshot {
            disk_type,
            quiet,
            parent,
            child,
        } => snapshot(&parent, child, disk_type.as_deref(), quiet),
        Command::Meta { action } => meta(action),
        Command::Cbt { action } => cbt(action),
    }
}

fn cbt(action: CbtAction) -> CliResult {
    match action {
        CbtAction::Enable { disk } => {
            let id = vdisk::cbt::enable(&disk).map_err(err)?;
            outln!(
                "Change tracking is on for {}; change ID {id}",
                disk.display()
            );
        }
        CbtAction::Disable { disk } => {
            if vdisk::cbt::disable(&disk).map_err(err)? {
                outln!("Change tracking is off for {}", disk.display());
            } else {
                outln!("Change tracking was not on for {}", disk.display());
            }
        }
        CbtAction::Status { json, disk } => {
            let d = Disk::open(&disk).map_err(err)?;
            let status = d.tracker().map(|t| t.status()).transpose().map_err(err)?;
            if json {
                let v = match &status {
                    None => json!({ "enabled": false }),
                    Some(s) => json!({
                        "enabled": true,
                        "file": s.path.display().to_string(),
                        "trusted": s.invalid.is_none(),
                        "reason": s.invalid,
                        "change_id": s.invalid.is_none().then_some(&s.change_id),
                        "block_size": s.block_size,
                        "note": s.note,
                    }),
                };
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
                );
                return Ok(());
            }
            match status {
                None => outln!("Change tracking: off"),
                Some(s) => {
                    outln!("Change tracking: on ({})", s.path.display());
                    outln!("Block size:      {}", human_bytes(s.block_size));
                    match &s.invalid {
                        None => outln!("Change ID:       {}", s.change_id),
                        Some(r) => outln!(
                            "Change IDs:      refused ({r}); the next open for writing restarts tracking"
                        ),
                    }
                    if !s.note.is_empty() {
                        outln!("History:         {}", s.note);
                    }
                }
            }
        }
        CbtAction::Changes { since, json, disk } => {
            // Streamed: a disk can have millions of changed areas.
            let d = Disk::open(&disk).map_err(err)?;
            let capacity = d.capacity();
            // A refused or malformed change ID is one error line and no output: an
            // empty query checks it before anything is written.
            d.for_each_changed_area(&since, 0, 0, |_, _| Ok(()))
                .map_err(err)?;
            let total = std::cell::Cell::new(0u64);
            if json {
                let areas = JsonWalk::new(|emit| {
                    d.for_each_changed_area(&since, 0, capacity, |o, l| {
                        total.set(total.get() + l);
                        emit(json!({"start": o, "length": l}))
                    })
                });
                return print_json(&ChangesJson {
                    areas,
                    bytes: &total,
                    change_id: d
                        .tracker()
                        .and_then(|t| t.status().ok())
                        .map(|s| s.change_id),
                    since: &since,
                });
            }
            print_walk(|emit| {
                emit(format_args!("{:>20} {:>20}\n", "Offset", "Length"))?;
                let mut count = 0u64;
                d.for_each_changed_area(&since, 0, capacity, |o, l| {
                    count += 1;
                    total.set(total.get() + l);
                    emit(format_args!("{o:>#20x} {l:>#20x}\n"))
                })?;
                emit(format_args!(
                    "{count} areas, {} changed\n",
                    human_bytes(total.get())
                ))
            })?;
        }
    }
    Ok(())
}

/// `cbt changes --json`: the keys in the order the whole-document output had them
/// (serde_json's map sorts them), the areas streamed, their total after them.
#[derive(serde::Serialize)]
struct ChangesJson<'a> {
    areas: JsonWalk<'a>,
    bytes: &'a std::cell::Cell<u64>,
    change_id: Option<String>,
    since: &'a str,
}

fn snapshot(parent: &Path, child: Option<PathBuf>, t: Option<&str>, quiet: bool) -> CliResult {
    use vdisk::ops::child::{create_child, default_child_type, next_child_name};
    let child = match child {
        Some(c) => c,
        None => next_child_name(parent).map_err(err)?,
    };
    let disk_type = match t {
        Some(t) => t.parse::<DiskType>().map_err(err)?,
        None => {
            let disk = Disk::open(parent).map_err(err)?;
            let ct = disk.links()[0]
                .descriptor()
                .map_err(err)?
                .create_type()
                .unwrap_or(vdisk::descriptor::CreateType::MonolithicSparse);
            default_child_type(&ct, disk.capacity())
        }
    };
    create_child(parent, &child, disk_type).map_err(err)?;
    if !quiet {
        outln!(
            "Created {} ({disk_type}), a child of {}",
            child.display(),
            parent.display()
        );
    }
    Ok(())
}

/// Runs a conversion with a progress bar (on a terminal, unless quiet).
fn convert_cmd(
    src: &Path,
    from: ImageFormat,
    dst: &Path,
    to: ImageFormat,
    opts: ConvertOptions,
    quiet: bool,
) -> CliResult {
    let bar = progress_bar(0, quiet, "converting");
    let mut progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
        true
    };
    let stats = match src.to_str().filter(|s| vdisk_utils::is_nbd_uri(s)) {
        // A remote disk is whatever the server serves: -f does not apply.
        Some(_) => {
            let source = vdisk_utils::open_for_reading(src).map_err(err)?;
            vdisk::convert_from(&*source, dst, to, &opts, &mut progress).map_err(err)?
        }
        None => convert(src, from, dst, to, &opts, &mut progress).map_err(err)?,
    };
    bar.finish_and_clear();
    if !quiet {
        outln!(
            "Converted {} to {} ({} virtual, {} of data written)",
            src.display(),
            dst.display(),
            human_bytes(stats.capacity),
            human_bytes(stats.written)
        );
    }
    Ok(())
}

fn hex(v: Option<u32>) -> Value {
    v.map_or(Value::Null, |c| json!(format!("{c:08x}")))
}

fn info(path: &PathBuf, as_json: bool) -> CliResult {
    if let Some(uri) = path.to_str().filter(|p| vdisk_utils::is_nbd_uri(p)) {
        return remote_info(uri, as_json);
    }
    let disk = Disk::open(path).map_err(err)?;
    let i = disk.info().map_err(err)?;
    for w in &i.warnings {
        eprintln!("vdiskmanager: warning: {w}");
    }
    if as_json {
        let chain: Vec<Value> = i
            .chain
            .iter()
            .map(|l| {
                json!({
                    "path": l.path.display().to_string(),
                    "createType": l.create_type,
                    "cid": hex(l.cid),
                    "parentCID": hex(l.parent_cid),
                    "parentFileNameHint": l.parent_file_name_hint,
                    "extents": l.extents.iter().map(|e| json!({
                        "access": e.access,
                        "sectors": e.sectors,
                        "type": e.kind,
                        "file": e.file.as_ref().map(|f| f.display().to_string()),
                        "fileBytes": e.file_bytes,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let geo = |g: Option<vdisk::Geometry>| {
            g.map_or(
                Value::Null,
                |g| json!({"cylinders": g.cylinders, "heads": g.heads, "sectors": g.sectors}),
            )
        };
        let v = json!({
            "path": path.display().to_string(),
            "capacity": i.capacity,
            "capacitySectors": i.capacity / 512,
            "diskType": i.disk_type.map(|t| t.name()),
            "createType": i.create_type,
            "adapterType": i.adapter_type,
            "hwVersion": i.hw_version,
            "geometry": geo(i.geometry),
            "biosGeometry": geo(i.bios_geometry),
            "uuid": i.uuid,
            "cid": hex(i.cid),
            "parentCID": hex(i.parent_cid),
            "allocatedBytes": i.allocated_bytes,
            "fileBytes": i.file_bytes,
            "chain": chain,
            "warnings": i.warnings,
        });
        outln!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    outln!("Disk:             {}", path.display());
    outln!(
        "Type:             {}",
        i.disk_type
            .map_or_else(|| i.create_type.clone(), |t| t.name().to_string())
    );
    outln!(
        "Capacity:         {} bytes ({}, {} sectors)",
        i.capacity,
        human_bytes(i.capacity),
        i.capacity / 512
    );
    outln!(
        "Adapter:          {}",
        i.adapter_type.as_deref().unwrap_or("-")
    );
    outln!(
        "Hardware version: {}",
        i.hw_version.map_or("-".to_string(), |v| v.to_string())
    );
    if let Some(g) = i.geometry {
        outln!(
            "Geometry (C/H/S): {}/{}/{}",
            g.cylinders,
            g.heads,
            g.sectors
        );
    }
    outln!(
        "CID:              {}",
        i.cid.map_or("-".into(), |c| format!("{c:08x}"))
    );
    outln!(
        "Parent CID:       {}",
        i.parent_cid.map_or("-".into(), |c| format!("{c:08x}"))
    );
    outln!("UUID:             {}", i.uuid.as_deref().unwrap_or("-"));
    match i.allocated_bytes {
        Some(n) => outln!("Allocated:        {n} bytes ({})", human_bytes(n)),
        None => outln!("Allocated:        unknown (see the warning)"),
    }
    outln!(
        "Files on host:    {} bytes ({})",
        i.file_bytes,
        human_bytes(i.file_bytes)
    );
    for (depth, l) in i.chain.iter().enumerate() {
        outln!(
            "Link {depth}:           {} ({})",
            l.path.display(),
            l.create_type
        );
        for e in &l.extents {
            outln!(
                "  {} {} {} {} ({} bytes)",
                e.access,
                e.sectors,
                e.kind,
                e.file
                    .as_ref()
                    .map_or("-".into(), |f| format!("\"{}\"", f.display())),
                e.file_bytes
            );
        }
    }
    Ok(())
}

/// `info` of an NBD export: what the server says of it.
fn remote_info(uri: &str, as_json: bool) -> CliResult {
    let disk = vdisk_nbd::client::RemoteDisk::open_uri(uri, &vdisk_utils::nbd_client_options(true))
        .map_err(err)?;
    let capacity = disk.capacity();
    let mut allocated = 0u64;
    disk.for_each_range(0, capacity, &mut |r| {
        if r.kind == RangeKind::Data {
            allocated += r.length;
        }
        Ok(())
    })
    .map_err(err)?;
    // Only a vdisk-nbd server of a tracked disk has a change ID.
    let change_id = disk.change_id().ok();
    let (minimum, preferred, maximum) = disk.block_sizes();
    if as_json {
        let v = json!({
            "uri": uri,
            "export": disk.export_name(),
            "description": disk.description(),
            "capacity": capacity,
            "capacitySectors": capacity / 512,
            "allocatedBytes": allocated,
            "writable": disk.is_writable(),
            "tls": disk.uses_tls(),
            "connections": disk.connections(),
            "blockSizes": {"minimum": minimum, "preferred": preferred, "maximum": maximum},
            "changeId": change_id,
        });
        outln!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    outln!("Disk:             {uri}");
    outln!("Export:           {}", disk.export_name());
    if let Some(d) = disk.description() {
        outln!("Description:      {d}");
    }
    outln!(
        "Capacity:         {capacity} bytes ({}, {} sectors)",
        human_bytes(capacity),
        capacity / 512
    );
    outln!(
        "Allocated:        {allocated} bytes ({})",
        human_bytes(allocated)
    );
    outln!(
        "Access:           {}{}, {} connection(s)",
        if disk.is_writable() {
            "read-write"
        } else {
            "read-only"
        },
        if disk.uses_tls() { ", TLS" } else { "" },
        disk.connections()
    );
    outln!("Block sizes:      minimum {minimum}, preferred {preferred}, maximum {maximum}");
    outln!("Change ID:        {}", change_id.as_deref().unwrap_or("-"));
    Ok(())
}

/// `map`: the allocation map, streamed (a disk can have millions of ranges).
fn map(path: &Path, as_json: bool) -> CliResult {
    let disk = vdisk_utils::open_for_reading(path).map_err(err)?;
    let capacity = disk.capacity();
    if as_json {
        return print_json(&JsonWalk::new(|emit| {
            disk.for_each_range(0, capacity, &mut |r| {
                emit(json!({
                    "start": r.offset,
                    "length": r.length,
                    "depth": r.depth,
                    "present": r.kind != RangeKind::Unallocated,
                    "zero": r.kind != RangeKind::Data,
                    "data": r.kind == RangeKind::Data,
                }))
            })
        }));
    }
    print_walk(|emit| {
        emit(format_args!(
            "{:>20} {:>20} {:>12} {:>5}\n",
            "Offset", "Length", "Kind", "Depth"
        ))?;
        disk.for_each_range(0, capacity, &mut |r| {
            let kind = match r.kind {
                RangeKind::Data => "data",
                RangeKind::Zero => "zero",
                RangeKind::Unallocated => "unallocated",
            };
            emit(format_args!(
                "{:>#20x} {:>#20x} {kind:>12} {:>5}\n",
                r.offset, r.length, r.depth
            ))
        })
    })
}

fn meta(action: MetaAction) -> CliResult {
    match action {
        MetaAction::List { disk } => {
            let d = Disk::open(&disk).map_err(err)?;
            for k in d.metadata_keys().map_err(err)? {
                let v = d.metadata(&k).map_err(err)?;
                outln!("{k} = \"{v}\"");
            }
        }
        MetaAction::Get { key, disk } => {
            let d = Disk::open(&disk).map_err(err)?;
            outln!("{}", d.metadata(&key).map_err(err)?);
        }
        MetaAction::Set { key, value, disk } => {
            let d = OpenOptions::new().write(true).open(&disk).map_err(err)?;
            d.set_metadata(&key, &value).map_err(err)?;
            d.close().map_err(err)?;
        }
    }
    Ok(())
}
