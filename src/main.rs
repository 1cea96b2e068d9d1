fn main() {
    std::process::exit(mirrorvol::cli::main())
}
