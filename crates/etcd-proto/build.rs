fn main() {
    // The protos are vendored (see proto/README.md) so the generated server and
    // client traits always match the etcd release the shards run.
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".")
        .compile_protos(
            &[
                "proto/etcd/api/etcdserverpb/rpc.proto",
                "proto/etcd/api/mvccpb/kv.proto",
                "proto/etcd/api/authpb/auth.proto",
            ],
            &["proto"],
        )
        .expect("compiling the vendored etcd protos (is protoc installed? apt-get install protobuf-compiler)");
}
