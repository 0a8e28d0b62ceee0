# Sourced by build/dist.sh (bash): the build's version and which inputs were left to their
# test defaults. Packages built from those trust the test CA and dial 127.0.0.1:6751: they
# must not pass for a release, so the default version carries a marker and the build says so
# at its end. Sets `version` and the array `defaulted`; defines `not_a_release`.
#
# "~test", not "+test": dpkg and rpm both sort "1.9.0.0~test" below "1.9.0.0", so a release
# of the same number upgrades a host that had the test build, never the reverse.
defaulted=()
if [ -n "${BUILD_VERSION:-}" ]; then
    version=$BUILD_VERSION
else
    version="$(sed -n 's/^VERSION = "\(.*\)"$/\1/p' "${project:-.}/elkeid_agent/version.py")~test"
    defaulted+=(BUILD_VERSION)
fi
[ -n "${CERTS_DIR:-}" ] || defaulted+=(CERTS_DIR)
[ -n "${PRODUCT_CONFIG:-}" ] || defaulted+=(PRODUCT_CONFIG)

# One line naming what the packages carry instead of a release's inputs; nothing for a release.
not_a_release() {
    [ ${#defaulted[@]} -gt 0 ] || return 0
    local what=() name
    for name in "${defaulted[@]}"; do
        case $name in
            BUILD_VERSION) what+=("the test version $version") ;;
            CERTS_DIR) what+=("the test CA and client certificate of build/out/test-certs") ;;
            PRODUCT_CONFIG) what+=("the loopback server of build/product.default.toml") ;;
        esac
    done
    local list
    list=$(printf '%s, ' "${what[@]}")
    echo "dist: NOT A RELEASE: ${defaulted[*]} not set, so these packages carry" \
        "${list%, }. A release sets all three."
}
