// Command tlogcheck checks gputally's ledger artifacts with golang.org/x/mod's sumdb/note and
// sumdb/tlog: an RFC 9162 and signed-note implementation written by other people, so that a
// bug shared by our writer and our verifier cannot pass unseen (tests/test_interop_go.py).
//
// It reads one JSON request on stdin and writes one JSON result on stdout. A note or proof
// that does not verify is a result, not a failure; only input it cannot read makes it exit 2
// with one line on stderr.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

type request struct {
	VKey   string         `json:"vkey"`
	Notes  []string       `json:"notes"`
	Leaves [][]byte       `json:"leaves"` // the entries' stored bytes, in log order
	Proofs []proofRequest `json:"proofs"` // what `gputally audit prove` prints
	// Optional: texts for Go to sign with this signer key, to compare with our signer.
	SKey  string   `json:"skey"`
	Texts []string `json:"texts"`
}

type proofRequest struct {
	Checkpoint string    `json:"checkpoint"`
	Size       int64     `json:"size"` // the answer's restatement of the checkpoint's size
	Root       tlog.Hash `json:"root"` // and root
	Inclusion  *struct {
		Entry    int64            `json:"entry"` // the ledger's row id; tlog knows only indexes
		Index    int64            `json:"index"`
		LeafHash tlog.Hash        `json:"leaf_hash"`
		Proof    tlog.RecordProof `json:"proof"`
	} `json:"inclusion"`
	Consistency *struct {
		Size  int64          `json:"size"`
		Root  tlog.Hash      `json:"root"`
		Proof tlog.TreeProof `json:"proof"`
	} `json:"consistency"`
}

type noteResult struct {
	Verified bool   `json:"verified"`
	Error    string `json:"error,omitempty"`
	Text     string `json:"text,omitempty"` // as note.Open split it from the signatures
	Origin   string `json:"origin,omitempty"`
	Size     int64  `json:"size"`
	Root     string `json:"root,omitempty"`
}

type proofResult struct {
	Checkpoint noteResult `json:"checkpoint"`
	// Whether the answer's size and root are those its checkpoint signs.
	Agrees bool `json:"agrees"`
	// "verified", or why not; absent when the request had no such proof.
	Inclusion   string `json:"inclusion,omitempty"`
	Consistency string `json:"consistency,omitempty"`
}

type result struct {
	Notes        []noteResult  `json:"notes"`
	RecordHashes []tlog.Hash   `json:"record_hashes"`
	Roots        []tlog.Hash   `json:"roots"` // Roots[n-1]: the tree of the first n leaves
	Proofs       []proofResult `json:"proofs"`
	Signed       []string      `json:"signed"`
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "tlogcheck: %s\n", strings.ReplaceAll(err.Error(), "\n", " "))
		os.Exit(2)
	}
}

func run() error {
	var req request
	dec := json.NewDecoder(os.Stdin)
	dec.DisallowUnknownFields() // a misspelt field would otherwise check nothing, silently
	if err := dec.Decode(&req); err != nil {
		return fmt.Errorf("malformed request: %v", err)
	}
	// The key file holds the key on one line; the line's end is not part of the key.
	verifier, err := note.NewVerifier(strings.TrimSuffix(req.VKey, "\n"))
	if err != nil {
		return fmt.Errorf("vkey: %v", err)
	}
	known := note.VerifierList(verifier)
	out := result{Notes: []noteResult{}, Proofs: []proofResult{}, Signed: []string{}}
	for _, msg := range req.Notes {
		out.Notes = append(out.Notes, openCheckpoint(msg, known))
	}

	out.RecordHashes, out.Roots, err = treeRoots(req.Leaves)
	if err != nil {
		return err
	}

	for _, p := range req.Proofs {
		out.Proofs = append(out.Proofs, checkProof(p, known, req.Leaves))
	}

	if req.SKey != "" {
		signer, err := note.NewSigner(req.SKey)
		if err != nil {
			return fmt.Errorf("skey: %v", err)
		}
		for _, text := range req.Texts {
			msg, err := note.Sign(&note.Note{Text: text}, signer)
			if err != nil {
				return fmt.Errorf("sign %q: %v", text, err)
			}
			out.Signed = append(out.Signed, string(msg))
		}
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}

// openCheckpoint verifies a note and reads it as a C2SP tlog-checkpoint. tlog.ParseTree reads
// only the go.sum database's own text ("go.sum database tree" where the origin goes), so the
// three lines are read here, as strictly as ParseTree reads its own.
func openCheckpoint(msg string, known note.Verifiers) noteResult {
	n, err := note.Open([]byte(msg), known)
	if err != nil {
		return noteResult{Error: err.Error()}
	}
	r := noteResult{Verified: true, Text: n.Text}
	lines := strings.SplitN(n.Text, "\n", 4) // anything after the root: extension lines
	if len(lines) < 4 || lines[0] == "" {
		r.Error = "checkpoint: not an origin, a size and a root"
		return r
	}
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil || size < 0 || strconv.FormatInt(size, 10) != lines[1] {
		r.Error = "checkpoint: malformed size"
		return r
	}
	root, err := tlog.ParseHash(lines[2])
	if err != nil || root.String() != lines[2] {
		r.Error = "checkpoint: malformed root"
		return r
	}
	r.Origin, r.Size, r.Root = lines[0], size, root.String()
	return r
}

// treeRoots builds the tree the way tlog's own servers do (stored hashes appended record by
// record), not by our recursive definition, and reads the root at every size from it.
func treeRoots(leaves [][]byte) ([]tlog.Hash, []tlog.Hash, error) {
	var stored []tlog.Hash
	reader := tlog.HashReaderFunc(func(indexes []int64) ([]tlog.Hash, error) {
		hashes := make([]tlog.Hash, len(indexes))
		for i, x := range indexes {
			if x < 0 || x >= int64(len(stored)) {
				return nil, fmt.Errorf("stored hash %d not written yet", x)
			}
			hashes[i] = stored[x]
		}
		return hashes, nil
	})
	records := []tlog.Hash{}
	roots := []tlog.Hash{}
	for i, data := range leaves {
		hashes, err := tlog.StoredHashes(int64(i), data, reader)
		if err != nil {
			return nil, nil, err
		}
		stored = append(stored, hashes...)
		records = append(records, tlog.RecordHash(data))
	}
	for n := int64(1); n <= int64(len(leaves)); n++ {
		root, err := tlog.TreeHash(n, reader)
		if err != nil {
			return nil, nil, err
		}
		roots = append(roots, root)
	}
	return records, roots, nil
}

// checkProof checks the proofs against the checkpoint they come with, trusting nothing in
// the answer but what that checkpoint's signature covers: its size and root.
func checkProof(p proofRequest, known note.Verifiers, leaves [][]byte) proofResult {
	r := proofResult{Checkpoint: openCheckpoint(p.Checkpoint, known)}
	var size int64
	var root tlog.Hash
	if r.Checkpoint.Error == "" {
		size = r.Checkpoint.Size
		root, _ = tlog.ParseHash(r.Checkpoint.Root)
		r.Agrees = p.Size == size && p.Root == root
	}
	if in := p.Inclusion; in != nil {
		r.Inclusion = status(func() error {
			if r.Checkpoint.Error != "" {
				return errors.New("checkpoint: " + r.Checkpoint.Error)
			}
			// The auditor hashes the entry it holds; the answer's leaf hash must be that.
			if in.Index >= 0 && in.Index < int64(len(leaves)) && tlog.RecordHash(leaves[in.Index]) != in.LeafHash {
				return errors.New("the leaf hash is not tlog.RecordHash of the entry's bytes")
			}
			return tlog.CheckRecord(in.Proof, size, root, in.Index, in.LeafHash)
		})
	}
	if c := p.Consistency; c != nil {
		r.Consistency = status(func() error {
			if r.Checkpoint.Error != "" {
				return errors.New("checkpoint: " + r.Checkpoint.Error)
			}
			return tlog.CheckTree(c.Proof, size, root, c.Size, c.Root)
		})
	}
	return r
}

func status(check func() error) string {
	if err := check(); err != nil {
		return err.Error()
	}
	return "verified"
}
