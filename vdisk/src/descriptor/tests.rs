//! Tests of the descriptor parser and writer.

use super::*;

const CANONICAL: &str = "# Disk DescriptorFile
version=1
encoding=\"UTF-8\"
CID=fffffffe
parentCID=ffffffff
createType=\"monolithicSparse\"

# Extent description
RW 20480 SPARSE \"disk.vmdk\"

# The Disk Data Base
#DDB

ddb.virtualHWVersion = \"4\"
ddb.geometry.cylinders = \"20\"
ddb.geometry.heads = \"16\"
ddb.geometry.sectors = \"63\"
ddb.adapterType = \"ide\"
ddb.toolsVersion = \"2147483647\"
";

const VMWARE: &str = "# Disk DescriptorFile
version=1
encoding=\"UTF-8\"
CID=00000000
parentCID=ffffffff
createType=\"monolithicSparse\"

# Extent description
RW 20480 SPARSE \"monolithicSparse.vmdk\"

# The Disk Data Base 
#DDB

ddb.adapterType = \"buslogic\"
ddb.deletable = \"true\"
ddb.encoding = \"UTF-8\"
ddb.geometry.cylinders = \"301\"
ddb.geometry.heads = \"4\"
ddb.geometry.sectors = \"17\"
ddb.longContentID = \"a4d7d8d0b8fdc51f3d5d6b6ffffffffe\"
ddb.uuid = \"60 00 C2 9b 69 2f c9 76-74 c4 07 9e 10 87 3b f9\"
ddb.virtualHWVersion = \"11\"
";

const CHILD: &str = "# Disk DescriptorFile
version=1
encoding=\"UTF-8\"
CID=11c0a93
parentCID=fffffffe
createType=\"twoGbMaxExtentSparse\"
parentFileNameHint=\"base.vmdk\"

# Extent description
RW 4192256 SPARSE \"child-s001.vmdk\"
RW 4192256 SPARSE \"child-s002.vmdk\"

# Change Tracking File
changeTrackPath=\"child-ctk.vmdk\"

# The Disk Data Base
#DDB

ddb.longContentID = \"0123456789abcdef0123456789abcdef\"
ddb.someFutureKey = \"kept\"
";

const ODD: &str = "  # leading comment\n\
\t\n\
VERSION = 1\n\
# comment between keys\n\
parentcid\t=\tffffffff\n\
   \n\
cid= 0000abcd  \n\
createtype = vmfs\n\
rw\t100\tvmfs\t\"my disk.vmdk\"\n\
RDONLY 200 FLAT \"other.vmdk\" 7\n\
NOACCESS 300 ZERO \n\
RW 400 flat \"\\\\.\\PhysicalDrive0\" 0 uuid-1 dev-2\n\
ddb.x=1\n\
ddb.X = \"2\"\n";

fn parse(s: &str) -> Descriptor {
    match Descriptor::parse(s.as_bytes()) {
        Ok(d) => d,
        Err(e) => panic!("parse failed: {e}\n{s}"),
    }
}

fn parse_err(b: &[u8]) -> DescriptorError {
    match Descriptor::parse(b) {
        Ok(d) => panic!("expected an error, got {d:?}"),
        Err(e) => e,
    }
}

fn fixtures() -> Vec<Vec<u8>> {
    vec![
        CANONICAL.as_bytes().to_vec(),
        VMWARE.as_bytes().to_vec(),
        CHILD.as_bytes().to_vec(),
        ODD.as_bytes().to_vec(),
        CANONICAL.replace('\n', "\r\n").into_bytes(),
        b"version=1\nCID=1\nRW 10 FLAT \"caf\xe9 na\xefve.vmdk\" 0\n".to_vec(),
        "RW 10 FLAT \"sch\u{f6}n \u{65e5}\u{672c}.vmdk\""
            .as_bytes()
            .to_vec(),
        Vec::new(),
        b"\n\n  \n".to_vec(),
    ]
}

fn canonical_extent() -> ExtentLine {
    ExtentLine {
        access: ExtentAccess::ReadWrite,
        sectors: 20480,
        kind: ExtentKind::Sparse,
        file: Some("disk.vmdk".into()),
        offset: None,
        extra: vec![],
    }
}

#[test]
fn new_gives_canonical_layout() {
    let d = Descriptor::new(
        &CreateType::MonolithicSparse,
        0xffff_fffe,
        0xffff_ffff,
        None,
        &[canonical_extent()],
        &[
            ("ddb.virtualHWVersion", "4"),
            ("ddb.geometry.cylinders", "20"),
            ("ddb.geometry.heads", "16"),
            ("ddb.geometry.sectors", "63"),
            ("ddb.adapterType", "ide"),
            ("ddb.toolsVersion", "2147483647"),
        ],
    );
    assert_eq!(String::from_utf8_lossy(&d.to_bytes()), CANONICAL);
    assert_eq!(parse(CANONICAL), d);
    assert_eq!(parse(CANONICAL).to_bytes(), CANONICAL.as_bytes());
}

#[test]
fn new_child_and_cid_padding() {
    let d = Descriptor::new(
        &CreateType::MonolithicSparse,
        0x11c0a93,
        0xfffffffe,
        Some("base.vmdk"),
        &[],
        &[("uuid", "1 2")],
    );
    let text = String::from_utf8_lossy(&d.to_bytes()).into_owned();
    assert!(text.contains(
        "CID=011c0a93\nparentCID=fffffffe\ncreateType=\"monolithicSparse\"\nparentFileNameHint=\"base.vmdk\"\n\n"
    ));
    assert!(text.ends_with("#DDB\n\nddb.uuid = \"1 2\"\n"));
    assert_eq!(parse(&text), d);
}

#[test]
fn vmware_sample() {
    let d = parse(VMWARE);
    assert_eq!(d.version(), Some(1));
    assert_eq!(d.cid(), Some(0));
    assert_eq!(d.parent_cid(), Some(0xffff_ffff));
    assert_eq!(d.create_type(), Some(CreateType::MonolithicSparse));
    assert_eq!(d.header("encoding"), Some("UTF-8"));
    assert_eq!(d.parent_file_name_hint(), None);
    let ext = d.extents();
    assert_eq!(ext.len(), 1);
    assert_eq!(
        ext.first().map(|e| e.file.as_deref()),
        Some(Some("monolithicSparse.vmdk"))
    );
    assert_eq!(ext.first().map(|e| e.sectors), Some(20480));
    assert_eq!(
        d.ddb("ddb.uuid"),
        Some("60 00 C2 9b 69 2f c9 76-74 c4 07 9e 10 87 3b f9")
    );
    assert_eq!(d.ddb("DDB.ADAPTERTYPE"), Some("buslogic"));
    assert_eq!(d.ddb_entries().len(), 9);
    assert!(!d.is_latin1());
    assert!(!d.uses_crlf());
    assert_eq!(d.to_bytes(), VMWARE.as_bytes());
}

#[test]
fn child_with_change_tracking() {
    let d = parse(CHILD);
    assert_eq!(d.cid(), Some(0x11c0a93));
    assert_eq!(d.parent_cid(), Some(0xffff_fffe));
    assert_eq!(d.create_type(), Some(CreateType::TwoGbMaxExtentSparse));
    assert_eq!(d.parent_file_name_hint(), Some("base.vmdk"));
    assert_eq!(d.header("changetrackpath"), Some("child-ctk.vmdk"));
    assert_eq!(d.extents().len(), 2);
    assert_eq!(d.ddb("ddb.someFutureKey"), Some("kept"));
    assert_eq!(d.to_bytes(), CHILD.as_bytes());
}

#[test]
fn crlf_round_trip_and_insert() {
    let text = CANONICAL.replace('\n', "\r\n");
    let mut d = parse(&text);
    assert!(d.uses_crlf());
    assert_eq!(d.to_bytes(), text.as_bytes());
    assert_eq!(d.ddb("ddb.adapterType"), Some("ide"));
    d.set_ddb("ddb.new", "v");
    let out = String::from_utf8_lossy(&d.to_bytes()).into_owned();
    assert_eq!(out, format!("{text}ddb.new = \"v\"\r\n"));
}

#[test]
fn nul_padding_is_cut() {
    let mut b = VMWARE.as_bytes().to_vec();
    b.extend(std::iter::repeat_n(0u8, 3000));
    b.extend_from_slice(b"garbage after NUL \r");
    let d = match Descriptor::parse(&b) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(d.to_bytes(), VMWARE.as_bytes());
}

#[test]
fn tolerant_lexing() {
    let d = parse(ODD);
    assert_eq!(d.version(), Some(1));
    assert_eq!(d.cid(), Some(0xabcd));
    assert_eq!(d.parent_cid(), Some(0xffff_ffff));
    assert_eq!(d.create_type(), Some(CreateType::Vmfs));
    let ext = d.extents();
    assert_eq!(ext.len(), 4);
    let e0 = ext.first().cloned();
    assert_eq!(
        e0,
        Some(ExtentLine {
            access: ExtentAccess::ReadWrite,
            sectors: 100,
            kind: ExtentKind::Vmfs,
            file: Some("my disk.vmdk".into()),
            offset: None,
            extra: vec![],
        })
    );
    let e1 = ext.get(1).cloned();
    assert_eq!(
        e1.map(|e| (e.access, e.kind, e.offset)),
        Some((ExtentAccess::ReadOnly, ExtentKind::Flat, Some(7)))
    );
    let e2 = ext.get(2).cloned();
    assert_eq!(
        e2.map(|e| (e.access, e.kind, e.file)),
        Some((ExtentAccess::NoAccess, ExtentKind::Zero, None))
    );
    let e3 = ext.get(3).cloned();
    assert_eq!(
        e3.map(|e| (e.file, e.offset, e.extra)),
        Some((
            Some("\\\\.\\PhysicalDrive0".to_string()),
            Some(0),
            vec!["uuid-1".to_string(), "dev-2".to_string()]
        ))
    );
    // duplicate keys: last wins, both kept
    assert_eq!(d.ddb("ddb.x"), Some("2"));
    assert_eq!(
        d.ddb_entries(),
        vec![("ddb.x".to_string(), "2".to_string())]
    );
    assert_eq!(d.to_bytes(), ODD.as_bytes());
}

#[test]
fn unquoted_and_parent_before_cid() {
    let d = parse("parentCID=ffffffff\nCID=1\ncreateType=monolithicFlat\nRW 1 FLAT \"a\"");
    assert_eq!(d.cid(), Some(1));
    assert_eq!(d.parent_cid(), Some(u32::MAX));
    assert_eq!(d.create_type(), Some(CreateType::MonolithicFlat));
}

#[test]
fn extent_line_rendering() {
    let mut e = canonical_extent();
    assert_eq!(e.to_line(), "RW 20480 SPARSE \"disk.vmdk\"");
    e.kind = ExtentKind::Flat;
    e.sectors = 4192256;
    e.file = Some("d-f001.vmdk".into());
    e.offset = Some(0);
    assert_eq!(e.to_line(), "RW 4192256 FLAT \"d-f001.vmdk\" 0");
    let z = ExtentLine {
        access: ExtentAccess::ReadWrite,
        sectors: 100,
        kind: ExtentKind::Zero,
        file: None,
        offset: Some(3),
        extra: vec![],
    };
    assert_eq!(z.to_line(), "RW 100 ZERO");
    e.extra = vec!["a b".into(), "".into(), "dropped".into()];
    e.file = Some("q\"uote".into());
    assert_eq!(e.to_line(), "RW 4192256 FLAT \"quote\" 0 \"a b\" \"\"");
}

#[test]
fn six_field_extent() {
    let d = parse("RW 8 FLAT \"a b.vmdk\"\t16  \"part uuid\"\n");
    let e = d.extents().first().cloned();
    assert_eq!(
        e.map(|e| (e.file, e.offset, e.extra)),
        Some((
            Some("a b.vmdk".into()),
            Some(16),
            vec!["part uuid".to_string()]
        ))
    );
}

#[test]
fn names_with_spaces_and_utf8() {
    let text = "RW 10 FLAT \"sch\u{f6}n \u{65e5}\u{672c} disk.vmdk\" 0\n";
    let d = parse(text);
    assert!(!d.is_latin1());
    let name = d.extents().first().and_then(|e| e.file.clone());
    assert_eq!(
        name.as_deref(),
        Some("sch\u{f6}n \u{65e5}\u{672c} disk.vmdk")
    );
    assert_eq!(d.to_bytes(), text.as_bytes());
}

#[test]
fn latin1_round_trip() {
    let b: &[u8] = b"CID=1\nRW 10 FLAT \"caf\xe9 \xff.vmdk\" 0\n";
    let mut d = match Descriptor::parse(b) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    assert!(d.is_latin1());
    let name = d
        .extents()
        .first()
        .and_then(|e| e.file.clone())
        .unwrap_or_default();
    assert_eq!(name, "caf\u{e9} \u{ff}.vmdk");
    assert_eq!(d.file_name_bytes(&name), b"caf\xe9 \xff.vmdk");
    assert_eq!(name_bytes(&name, false), "caf\u{e9} \u{ff}.vmdk".as_bytes());
    assert_eq!(d.to_bytes(), b);
    d.set_cid(2);
    assert_eq!(
        d.to_bytes(),
        b"CID=00000002\nRW 10 FLAT \"caf\xe9 \xff.vmdk\" 0\n"
    );
}

#[test]
fn no_ddb_section() {
    let text = "version=1\nCID=00000001\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n# Extent description\nRW 8 VMFS \"x-flat.vmdk\"";
    let mut d = parse(text);
    assert!(d.ddb_entries().is_empty());
    assert_eq!(d.to_bytes(), text.as_bytes());
    d.set_ddb("ddb.adapterType", "lsilogic");
    let out = String::from_utf8_lossy(&d.to_bytes()).into_owned();
    assert_eq!(
        out,
        format!("{text}\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\n")
    );
    assert_eq!(parse(&out), d);
}

#[test]
fn errors_name_the_line() {
    let e = parse_err(b"version=1\n\nRW 99999999999999999999 FLAT \"a\"\n");
    assert_eq!(e.line, 3);
    assert!(e.message.contains("too large"), "{e}");
    let e = parse_err(b"a=1\nb=2\nc=3\nd=4\ne=5\nf=6\nRW 12x FLAT \"a\"\n");
    assert_eq!(
        e.to_string(),
        "line 7: extent sector count \"12x\" is not a number"
    );
    let e = parse_err(b"CID=1\ncreateType=\"vmfs\n");
    assert_eq!((e.line, e.message.as_str()), (2, "missing closing quote"));
    let e = parse_err(b"RW 1 FLAT \"a.vmdk\n");
    assert_eq!((e.line, e.message.as_str()), (1, "missing closing quote"));
    let e = parse_err(b"\nRW 1 FLAT \"a\" 0 u d extra\n");
    assert_eq!(e.line, 2);
    assert!(e.message.contains("more than 7"), "{e}");
    let e = parse_err(b"CID=1\r\nparentCID=2\rx\r\n");
    assert_eq!(e.to_string(), "line 2: stray carriage return");
    let e = parse_err(b"CID=1\r");
    assert_eq!(e.line, 1);
    let e = parse_err(b"RW 1 FLAT \"a\" 1x");
    assert!(e.message.contains("offset"), "{e}");
    let e = parse_err(b"RW 1 FLAT");
    assert!(e.message.contains("no file name"), "{e}");
    let e = parse_err(b"RW 1");
    assert!(e.message.contains("no type"), "{e}");
    let e = parse_err(b"RW");
    assert!(e.message.contains("no sector count"), "{e}");
    let e = parse_err(b"RW 1 FLAT a.vmdk");
    assert!(e.message.contains("double quotes"), "{e}");
    let e = parse_err(b"createType=\"vmfs\" x");
    assert!(e.message.contains("after closing quote"), "{e}");
    let e = parse_err(b"createType=vmfs x");
    assert!(e.message.contains("after value"), "{e}");
    let e = parse_err(b"hello world");
    assert_eq!(e.line, 1);
    let e = parse_err(b"=1");
    assert!(e.message.contains("missing key"), "{e}");
}

#[test]
fn limits() {
    let big = vec![b'#'; crate::limits::MAX_DESCRIPTOR_BYTES + 1];
    assert_eq!(parse_err(&big).line, 0);
    let many = "\n".repeat(crate::limits::MAX_DESCRIPTOR_LINES + 1);
    assert_eq!(
        parse_err(many.as_bytes()).line,
        crate::limits::MAX_DESCRIPTOR_LINES + 1
    );
    let ext = "RW 1 ZERO\n".repeat(crate::limits::MAX_EXTENTS + 1);
    let e = parse_err(ext.as_bytes());
    assert_eq!(e.line, crate::limits::MAX_EXTENTS + 1);
    assert!(e.message.contains("extents"), "{e}");
}

#[test]
fn no_validation_in_parse() {
    let d = parse("# nothing here\n");
    assert_eq!(d.create_type(), None);
    assert!(d.extents().is_empty());
    assert_eq!(d.cid(), None);
    let d = parse("CID=zz\nversion=x\n");
    assert_eq!(d.cid(), None);
    assert_eq!(d.version(), None);
    assert_eq!(d.header("cid"), Some("zz"));
}

fn replace_line(text: &str, from: &str, to: &str) -> String {
    text.lines()
        .map(|l| if l == from { to } else { l })
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn setters_preserve_other_lines() {
    let mut d = parse(CHILD);
    d.set_cid(0xabc);
    assert_eq!(
        String::from_utf8_lossy(&d.to_bytes()),
        replace_line(CHILD, "CID=11c0a93", "CID=00000abc")
    );
    let mut d = parse(CHILD);
    d.set_ddb("DDB.SOMEFUTUREKEY", "new value");
    assert_eq!(
        String::from_utf8_lossy(&d.to_bytes()),
        replace_line(
            CHILD,
            "ddb.someFutureKey = \"kept\"",
            "ddb.someFutureKey = \"new value\""
        )
    );
    let mut d = parse(CHILD);
    d.set_parent_file_name_hint(Some("../b\"ase\r\n.vmdk"));
    assert_eq!(
        String::from_utf8_lossy(&d.to_bytes()),
        replace_line(
            CHILD,
            "parentFileNameHint=\"base.vmdk\"",
            "parentFileNameHint=\"../base.vmdk\""
        )
    );
    d.set_parent_file_name_hint(None);
    assert_eq!(d.parent_file_name_hint(), None);
    let mut d = parse(VMWARE);
    d.set_parent_file_name_hint(Some("p.vmdk"));
    d.set_parent_cid(0x1234);
    assert_eq!(
        String::from_utf8_lossy(&d.to_bytes()),
        VMWARE
            .replace("parentCID=ffffffff", "parentCID=00001234")
            .replace(
                "createType=\"monolithicSparse\"\n",
                "createType=\"monolithicSparse\"\nparentFileNameHint=\"p.vmdk\"\n"
            )
    );
    assert_eq!(d.header("parentFileNameHint"), Some("p.vmdk"));
}

#[test]
fn inserted_cid_keys_stay_adjacent() {
    let mut d = parse("version=1\nparentCID=ffffffff\ncreateType=\"vmfs\"\nRW 1 VMFS \"a\"\n");
    d.set_cid(5);
    assert_eq!(
        String::from_utf8_lossy(&d.to_bytes()),
        "version=1\nCID=00000005\nparentCID=ffffffff\ncreateType=\"vmfs\"\nRW 1 VMFS \"a\"\n"
    );
    let mut d = parse("CID=1\ncreateType=\"vmfs\"\nRW 1 VMFS \"a\"");
    d.set_parent_cid(7);
    d.set_header("encoding", "UTF-8", true);
    d.set_header("ddb.via", "header", false);
    assert_eq!(
        String::from_utf8_lossy(&d.to_bytes()),
        "CID=1\nparentCID=00000007\ncreateType=\"vmfs\"\nencoding=\"UTF-8\"\nRW 1 VMFS \"a\"\n\n# The Disk Data Base\n#DDB\n\nddb.via = \"header\"\n"
    );
    d.remove_header("ENCODING");
    assert_eq!(d.header("encoding"), None);
    assert!(d.remove_ddb("ddb.VIA"));
    assert!(!d.remove_ddb("ddb.via"));
    d.set_create_type(&CreateType::SeSparse);
    assert_eq!(d.header("createType"), Some("seSparse"));
}

#[test]
fn set_extents_in_place_and_new() {
    let mut d = parse(CHILD);
    let mut e = canonical_extent();
    e.file = Some("one.vmdk".into());
    d.set_extents(&[e.clone()]);
    let expected = CHILD.replace(
        "RW 4192256 SPARSE \"child-s001.vmdk\"\nRW 4192256 SPARSE \"child-s002.vmdk\"\n",
        "RW 20480 SPARSE \"one.vmdk\"\n",
    );
    assert_eq!(String::from_utf8_lossy(&d.to_bytes()), expected);
    assert_eq!(d.extents(), vec![e.clone()]);

    let mut d = parse("version=1\nCID=1\n\n#DDB\nddb.a = \"b\"\n");
    d.set_extents(&[e.clone()]);
    assert_eq!(
        String::from_utf8_lossy(&d.to_bytes()),
        "version=1\nCID=1\n\n# Extent description\nRW 20480 SPARSE \"one.vmdk\"\n\n#DDB\nddb.a = \"b\"\n"
    );
    let mut d = parse("CID=1\n# Extent description\n");
    d.set_extents(&[e]);
    assert_eq!(
        String::from_utf8_lossy(&d.to_bytes()),
        "CID=1\n# Extent description\nRW 20480 SPARSE \"one.vmdk\"\n"
    );
}

#[test]
fn create_type_names() {
    for (s, t) in [
        ("monolithicsparse", CreateType::MonolithicSparse),
        ("2GbMaxExtentSparse", CreateType::TwoGbMaxExtentSparse),
        ("2gbmaxextentflat", CreateType::TwoGbMaxExtentFlat),
        ("vmfsSeSparse", CreateType::SeSparse),
        ("vmfsRDM", CreateType::VmfsRawDeviceMap),
        ("VMFSRDMP", CreateType::VmfsPassthroughRawDeviceMap),
        ("vsanSparse", CreateType::VsanSparse),
    ] {
        assert_eq!(CreateType::parse(s), t);
        assert_eq!(CreateType::parse(t.as_str()), t);
    }
    assert_eq!(
        CreateType::TwoGbMaxExtentFlat.as_str(),
        "twoGbMaxExtentFlat"
    );
    assert_eq!(CreateType::parse("weird").as_str(), "weird");
    assert_eq!(ExtentKind::parse("vmfsSparse"), ExtentKind::VmfsSparse);
    assert_eq!(
        ExtentKind::parse("NEWTYPE"),
        ExtentKind::Other("NEWTYPE".into())
    );
    let d = parse("RW 5 NEWTYPE \"f\"\n");
    assert_eq!(
        d.extents().first().map(|e| e.kind.clone()),
        Some(ExtentKind::Other("NEWTYPE".into()))
    );
}

#[test]
fn reparse_is_identity() {
    for f in fixtures() {
        let d = match Descriptor::parse(&f) {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(d.to_bytes(), f);
        assert_eq!(Descriptor::parse(&d.to_bytes()).as_ref(), Ok(&d));
        // and after modifications
        let mut m = d.clone();
        m.set_cid(0x1234_5678);
        m.set_parent_cid(0xffff_ffff);
        m.set_header("weird key", "a b\"c", false);
        m.set_ddb("ddb.new", "x\ny");
        m.set_parent_file_name_hint(Some("p q.vmdk"));
        let mut exts = m.extents();
        exts.push(ExtentLine {
            access: ExtentAccess::NoAccess,
            sectors: 9,
            kind: ExtentKind::Other("".into()),
            file: None,
            offset: Some(1),
            extra: vec!["x".into()],
        });
        m.set_extents(&exts);
        let again = Descriptor::parse(&m.to_bytes());
        assert_eq!(
            again.as_ref(),
            Ok(&m),
            "{}",
            String::from_utf8_lossy(&m.to_bytes())
        );
        assert_eq!(m.cid(), Some(0x1234_5678));
        assert_eq!(m.header("weirdkey"), Some("a bc"));
        assert_eq!(m.ddb("ddb.new"), Some("xy"));
    }
}

/// Minimal xorshift64 PRNG for the no-panic test.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

fn exercise(b: &[u8]) {
    if let Ok(mut d) = Descriptor::parse(b) {
        let _ = (d.version(), d.cid(), d.parent_cid(), d.create_type());
        let _ = (d.extents(), d.ddb_entries(), d.parent_file_name_hint());
        let out = d.to_bytes();
        assert_eq!(Descriptor::parse(&out).as_ref(), Ok(&d));
        d.set_cid(1);
        d.set_ddb("ddb.k", "v");
        let ext = d.extents();
        d.set_extents(&ext);
        // After edits the flags may legitimately differ (e.g. the only
        // Latin-1 line was rewritten); the lines must not.
        let again = Descriptor::parse(&d.to_bytes()).map(|x| x.lines);
        assert_eq!(again.as_ref(), Ok(&d.lines));
    }
}

#[test]
fn never_panics() {
    let alphabet: &[u8] = b" \t\r\n\"=#\0\xe9\xc3RWZEROddb.0123456789x";
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for f in fixtures() {
        for n in 0..=f.len() {
            exercise(f.get(..n).unwrap_or(&[]));
        }
        for _ in 0..300 {
            let mut m = f.clone();
            let edits = 1 + rng.next() % 4;
            for _ in 0..edits {
                if m.is_empty() {
                    m.push(b'x');
                }
                let pos = usize::try_from(rng.next() % m.len() as u64).unwrap_or(0);
                let pick = usize::try_from(rng.next() % alphabet.len() as u64).unwrap_or(0);
                let byte = alphabet.get(pick).copied().unwrap_or(b' ');
                match rng.next() % 3 {
                    0 => {
                        if let Some(slot) = m.get_mut(pos) {
                            *slot = byte;
                        }
                    }
                    1 => m.insert(pos, byte),
                    _ => {
                        m.remove(pos);
                    }
                }
            }
            exercise(&m);
        }
    }
}

#[test]
fn byte_order_mark_stays_first_when_lines_are_inserted_before_the_first_line() {
    // Found by fuzzing: a header inserted before a first line that started with the
    // BOM moved the BOM to line 2, where it is an error.
    let mut d = Descriptor::parse("\u{feff}# Disk DescriptorFile\n".as_bytes()).unwrap();
    assert_eq!(d.to_bytes(), "\u{feff}# Disk DescriptorFile\n".as_bytes());
    d.set_cid(0x1234);
    let text = d.to_bytes();
    assert!(
        text.starts_with("\u{feff}".as_bytes()),
        "{:?}",
        String::from_utf8_lossy(&text)
    );
    assert_eq!(Descriptor::parse(&text).unwrap().cid(), Some(0x1234));
}
