// olm-validate: the bundle checks of `operator-sdk bundle validate` (operator-sdk itself is not on
// the Go module proxy), from the library it uses, github.com/operator-framework/api.
// Usage: olm-validate <bundle dir>. Exits 1 when any validator reports an error.
package main

import (
	"fmt"
	"os"

	"github.com/operator-framework/api/pkg/manifests"
	"github.com/operator-framework/api/pkg/validation"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: olm-validate <bundle dir>")
		os.Exit(2)
	}
	bundle, err := manifests.GetBundleFromDir(os.Args[1])
	if err != nil {
		fmt.Fprintf(os.Stderr, "loading the bundle: %v\n", err)
		os.Exit(1)
	}
	objects := []interface{}{bundle}
	if bundle.CSV != nil {
		objects = append(objects, bundle.CSV)
	}
	for _, crd := range bundle.V1CRDs {
		objects = append(objects, crd)
	}
	validators := validation.DefaultBundleValidators.WithValidators(
		validation.OperatorHubValidator,
		validation.ObjectValidator,
	)
	failed := false
	for _, result := range validators.Validate(objects...) {
		for _, e := range result.Errors {
			failed = true
			fmt.Printf("ERROR %s: %s\n", result.Name, e.Error())
		}
		for _, w := range result.Warnings {
			fmt.Printf("WARN %s: %s\n", result.Name, w.Error())
		}
	}
	if failed {
		os.Exit(1)
	}
	fmt.Println("bundle is valid")
}
