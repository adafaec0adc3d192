//! `fcgi-pool [flags] -- /usr/bin/php-cgi [args]`: the pool, with any FastCGI program as each
//! worker's application (see the README, "Any FastCGI program").

fn main() {
    supervisor::run_program()
}
